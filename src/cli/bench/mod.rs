//! `moe bench`: the 22-scenario benchmark suite (CONTRACT §10), plus the
//! large-batch training step of issue 23.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod report;
mod scenarios;
mod suite;

use rosetta_moe::{MoeError, Result, kernels};
use suite::{Options, Report, ScenarioResult};

/// Run the benchmark suite: every scenario in its own process, JSON in the
/// published schema, a Markdown report and SVG plots.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only scenarios whose id matches this pattern (`*` is a wildcard).
    #[arg(long, default_value = "*")]
    scenario: String,
    /// Timed trials per scenario.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// Warm-up runs per scenario.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Seed of the models and inputs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Intra-op threads each model may use (1 = single-threaded, as the
    /// contract's scenarios are defined; 2 splits large matrix multiplies and
    /// the AdamW update over two cores).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    threads: u64,
    /// Fewer trials (3 after 1 warm-up) for smoke runs.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    json: super::JsonArg,
    /// Write the Markdown report.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Write the SVG plots into this directory.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// Do not run: regenerate the report and plots from a JSON file of an earlier run.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["scenario", "quick"])]
    from: Option<PathBuf>,
    /// Internal: measure one scenario in this process and print its JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    args.json.check()?;
    if let Some(path) = &args.markdown {
        super::check_out_file(path)?;
    }
    let options = if args.quick {
        Options {
            trials: 3,
            warmup: 1,
            seed: args.seed,
            threads: args.threads as usize,
        }
    } else {
        Options {
            trials: args.trials.max(1),
            warmup: args.warmup,
            seed: args.seed,
            threads: args.threads as usize,
        }
    };
    if let Some(id) = &args.child {
        let scenario = suite::select(id)
            .into_iter()
            .next()
            .ok_or_else(|| unknown(id))?;
        let result = suite::measure(&scenario, options)?;
        println!(
            "{}",
            serde_json::to_string(&result).expect("results serialise")
        );
        return Ok(());
    }
    let report = match &args.from {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| MoeError::io(path, e))?;
            serde_json::from_str(&text).map_err(|e| MoeError::Json {
                path: path.clone(),
                reason: e.to_string(),
            })?
        }
        None => run_suite(&args, options)?,
    };
    let say = |line: String| args.json.say(format_args!("{line}"));
    say(report::console(&report).trim_end().to_string());
    args.json.emit(&report)?;
    if let Some(dir) = &args.plots {
        report::plots(&report, dir)?;
        say(format!("wrote plots to {}", dir.display()));
    }
    if let Some(path) = &args.markdown {
        let plots = args.plots.as_deref().map(|dir| relative_to(dir, path));
        let text = report::markdown(&report, plots.as_deref());
        rosetta_moe::atomic_write::write_atomic(path, text.as_bytes())?;
        say(format!("wrote {}", path.display()));
    }
    Ok(())
}

fn unknown(pattern: &str) -> MoeError {
    MoeError::InvalidConfig(format!("no benchmark scenario matches {pattern:?}"))
}

/// Runs every selected scenario in a child process.
fn run_suite(args: &Args, options: Options) -> Result<Report> {
    let scenarios = suite::select(&args.scenario);
    if scenarios.is_empty() {
        return Err(unknown(&args.scenario));
    }
    eprintln!("measuring the single-core FMA peak…");
    let fma_peak_gflops = kernels::fma_peak_gflops(Duration::from_millis(500));
    let command = std::env::args()
        .map(|a| shell_word(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let bar = super::progress(
        scenarios.len() as u64,
        "{bar:30} {pos}/{len} scenarios  {msg}  [{elapsed_precise}]",
    );
    let exe = std::env::current_exe().map_err(|e| MoeError::io("moe", e))?;
    let mut results = Vec::with_capacity(scenarios.len());
    for scenario in &scenarios {
        bar.set_message(scenario.id.clone());
        let output = Command::new(&exe)
            .args(["bench", "--child", &scenario.id])
            .args(["--trials", &options.trials.to_string()])
            .args(["--warmup", &options.warmup.to_string()])
            .args(["--seed", &options.seed.to_string()])
            .args(["--threads", &options.threads.to_string()])
            .output()
            .map_err(|e| MoeError::io(&exe, e))?;
        if !output.status.success() {
            bar.abandon();
            return Err(MoeError::io(
                &exe,
                std::io::Error::other(format!(
                    "scenario {} failed: {}",
                    scenario.id,
                    String::from_utf8_lossy(&output.stderr).trim()
                )),
            ));
        }
        let result: ScenarioResult =
            serde_json::from_slice(&output.stdout).map_err(|e| MoeError::Json {
                path: format!("bench --child {}", scenario.id).into(),
                reason: e.to_string(),
            })?;
        results.push(result);
        bar.inc(1);
    }
    bar.finish_and_clear();
    // After the scenarios: a child inherits its parent's peak RSS, and the
    // bandwidth probe's buffers would count in every scenario's.
    eprintln!("measuring the streaming bandwidth…");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let probes = suite::Probes::measure(fma_peak_gflops, cores);
    let metadata = suite::metadata(
        options,
        probes,
        command.replacen(
            &shell_word(&std::env::args().next().unwrap_or_default()),
            "moe",
            1,
        ),
    );
    suite::finish(metadata, results)
}

/// `arg` quoted for a shell when it needs to be.
fn shell_word(arg: &str) -> String {
    if arg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=*:".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// `dir` as seen from the directory holding `file` (for links in the report).
fn relative_to(dir: &Path, file: &Path) -> String {
    let base = file.parent().unwrap_or(Path::new(""));
    dir.strip_prefix(base).unwrap_or(dir).display().to_string()
}
