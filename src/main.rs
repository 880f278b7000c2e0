//! `moe`: the command-line front end of rosetta-moe.

mod cli;

/// Counts allocations for the benchmark's `alloc_bytes`.
#[global_allocator]
static ALLOCATOR: rosetta_moe::kernels::CountingAllocator = rosetta_moe::kernels::CountingAllocator;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
