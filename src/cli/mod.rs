//! Command-line parsing and one module per command.

mod bench;
mod convergence;
mod dump;
mod eval;
mod export;
mod generate;
mod init;
mod legend;
mod recipe;
mod stability;
mod train;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rosetta_moe::{MoeError, Result};

/// rosetta-moe: a Mixture-of-Experts Transformer from first principles.
#[derive(Debug, Parser)]
#[command(name = "moe", version = version(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Bench(bench::Args),
    Convergence(convergence::Args),
    Dump(dump::Args),
    Eval(eval::Args),
    Export(export::Args),
    Generate(generate::Args),
    Init(init::Args),
    Stability(stability::Args),
    Train(Box<train::Args>),
}

/// `moe --version`: the crate's version, then the SIMD level the kernels run
/// at, the levels this CPU can run and its model.
fn version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{}\n{}",
            env!("CARGO_PKG_VERSION"),
            rosetta_moe::kernels::describe_simd()
        )
    })
}

/// Runs the parsed command, once `MOE_SIMD` (if set) is known to name a level
/// this CPU can run.
pub fn run(cli: Cli) -> Result<()> {
    rosetta_moe::kernels::requested_level()?;
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Convergence(args) => convergence::run(args),
        Command::Dump(args) => dump::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Export(args) => export::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Init(args) => init::run(args),
        Command::Stability(args) => stability::run(args),
        Command::Train(args) => train::run(*args),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("templates are literals")
            .progress_chars("=> "),
    );
    bar
}

/// `--json [FILE]`, the same on every command: the command's report as JSON,
/// on stdout when FILE is omitted (or `-`), else written to FILE.
#[derive(Debug, Clone, clap::Args)]
pub struct JsonArg {
    /// Print the report as one JSON line on stdout (the human-readable text
    /// then goes to stderr), or with FILE write it there instead, pretty.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
}

impl JsonArg {
    /// True when the JSON goes to stdout.
    pub fn on_stdout(&self) -> bool {
        self.json.as_deref() == Some(Path::new("-"))
    }

    /// Prints a line of human-readable text: on stdout, or on stderr when
    /// stdout carries the JSON.
    pub fn say(&self, line: std::fmt::Arguments<'_>) {
        if self.on_stdout() {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// Refuses a FILE whose directory does not exist (before any work is done).
    pub fn check(&self) -> Result<()> {
        match &self.json {
            Some(path) if !self.on_stdout() => check_out_file(path),
            _ => Ok(()),
        }
    }

    /// Emits `value` where `--json` asked (nowhere without it).
    pub fn emit(&self, value: &impl serde::Serialize) -> Result<()> {
        match &self.json {
            None => Ok(()),
            Some(_) if self.on_stdout() => {
                println!(
                    "{}",
                    serde_json::to_string(value).expect("reports serialise")
                );
                Ok(())
            }
            Some(path) => {
                write_json(path, value)?;
                self.say(format_args!("wrote {}", path.display()));
                Ok(())
            }
        }
    }
}

/// `--threads N`, the same on `train`, `generate` and `eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct ThreadsArg {
    /// Threads for large matrix multiplies (and training's AdamW update);
    /// results are bit-identical for any count [default: every core, at most 8].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=rosetta_moe::kernels::MAX_THREADS as u64))]
    threads: Option<u64>,
}

impl ThreadsArg {
    /// Sets the kernels' thread count (given, or one per core) and returns it.
    pub fn apply(&self) -> usize {
        let n = self.threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |n| n as usize,
        );
        rosetta_moe::kernels::set_threads(n)
    }
}

/// Refuses an output file whose directory does not exist or that names a directory.
pub fn check_out_file(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let problem = if !dir.is_dir() {
        "its directory does not exist"
    } else if path.is_dir() {
        "is a directory"
    } else {
        return Ok(());
    };
    Err(MoeError::io(
        path,
        std::io::Error::new(std::io::ErrorKind::NotFound, problem),
    ))
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("reports serialise");
    rosetta_moe::atomic_write::write_atomic(path, text.as_bytes())
}

/// Refuses to write into `dir` when it already holds files (other than a lock
/// file left by an earlier run), unless `force`.
pub fn ensure_fresh_dir(dir: &Path, force: bool) -> Result<()> {
    let occupied = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name() != rosetta_moe::error::LOCK_FILE)
        })
        .unwrap_or(false);
    if occupied && !force {
        return Err(MoeError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "directory is not empty (pass --force to overwrite)",
            ),
        ));
    }
    Ok(())
}
