//! The benchmark suite of CONTRACT §10: 22 scenarios over five axes
//! (memory, compiler, type_system, parallel, scale), with the JSON schema of
//! the published rosetta-moe suite and a Markdown report with plots.
//!
//! Each scenario runs in a fresh child process (`moe bench --child ID`), so
//! its peak RSS is its own. Within a trial, a workload shorter than a
//! millisecond (the kernels) is repeated until the trial lasts at least a
//! millisecond and the per-run time is the trial time divided by the runs, so
//! the clock's resolution does not dominate. CPU time comes from getrusage,
//! allocated bytes from the counting allocator the `moe` binary installs, and
//! every GFLOP/s figure is also given as a percentage of the single-core FMA
//! peak the suite measures at start.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::scenarios::{self, Scenario};
use rosetta_moe::error::{MoeError, Result};
use rosetta_moe::kernels;

/// Statically measured facts about `src/` (computed at build time).
pub const STATIC_METRICS: &str = include_str!(concat!(env!("OUT_DIR"), "/static_metrics.json"));

/// How to run the suite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Timed trials per scenario.
    pub trials: usize,
    /// Untimed runs before the trials.
    pub warmup: usize,
    /// Seed of the models and inputs.
    pub seed: u64,
    /// Intra-op threads each model may use (1 = single-threaded kernels).
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            trials: 10,
            warmup: 3,
            seed: 42,
            threads: 1,
        }
    }
}

/// The whole run: metadata, static metrics, one result per scenario, and the
/// suite-level ratios.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Where and how it ran.
    pub metadata: Metadata,
    /// Size of the implementation.
    pub static_metrics: StaticMetrics,
    /// One entry per scenario, in the contract's order.
    pub scenarios: Vec<ScenarioResult>,
    /// Ratios across scenarios.
    pub derived: SuiteDerived,
}

/// The machine and the settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// "rust".
    pub language: String,
    /// The compiler that built the binary.
    pub language_version: String,
    /// Operating system and kernel.
    pub os: String,
    /// CPU model name.
    pub cpu_model: String,
    /// Hardware threads available.
    pub threads: usize,
    /// When the run started (RFC 3339, UTC).
    pub timestamp: String,
    /// Timed trials per scenario.
    pub n_trials: usize,
    /// Warm-up runs per scenario.
    pub n_warmup: usize,
    /// Seed of models and inputs.
    pub seed: u64,
    /// Single-core FMA throughput measured at start, GFLOP/s.
    pub fma_peak_gflops: f64,
    /// Intra-op threads each model used (`moe bench --threads`; 1 = off).
    #[serde(default = "one")]
    pub intra_op_threads: usize,
    /// The command line that produced the run.
    pub command: String,
}

fn one() -> usize {
    1
}

/// Size of `src/`: gzip bytes, source lines, function definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StaticMetrics {
    /// gzip size of all of `src/`.
    pub source_gzip_bytes: u64,
    /// Lines that are neither blank nor comment-only.
    pub sloc: u64,
    /// `fn` definitions.
    pub function_count: u64,
    /// Source files.
    pub files: u64,
}

/// One scenario's measurements (CONTRACT §10 schema, plus `reps_per_trial`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// Scenario identifier.
    pub id: String,
    /// Axis.
    pub axis: String,
    /// Workload parameters.
    pub params: serde_json::Value,
    /// Untimed runs.
    pub warmup_runs: usize,
    /// Timed trials.
    pub trial_runs: usize,
    /// Runs per trial (> 1 only for workloads under a millisecond).
    pub reps_per_trial: usize,
    /// Wall time of one run, per trial.
    pub timings_ns: Vec<u64>,
    /// CPU time (user + system, all threads) of one run, per trial.
    pub cpu_times_ns: Vec<u64>,
    /// Median of `timings_ns`.
    pub median_ns: u64,
    /// 95th percentile of `timings_ns`.
    pub p95_ns: u64,
    /// Fastest trial.
    pub min_ns: u64,
    /// Slowest trial.
    pub max_ns: u64,
    /// Interquartile range of `timings_ns`.
    pub iqr_ns: u64,
    /// Median of `cpu_times_ns`.
    pub cpu_median_ns: u64,
    /// Memory.
    pub memory: Memory,
    /// Garbage collection (none in Rust: always zero).
    pub gc: Gc,
    /// Checks on the last run's output.
    pub numerical: Numerical,
    /// Tokens per second at the median.
    pub throughput_tokens_per_sec: f64,
    /// Rates at the median.
    pub derived: Derived,
}

/// Memory of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// Peak resident set of the scenario's own process, in bytes.
    pub peak_rss_bytes: u64,
    /// Bytes allocated per run during the timed trials (mean).
    pub alloc_bytes: u64,
}

/// Garbage collection counters (kept for the schema; Rust has none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gc {
    /// Always 0.
    pub total_gc_time_ns: u64,
    /// Always 0.
    pub gc_pause_count: u64,
}

/// NaN, ∞ and magnitude of the last run's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Numerical {
    /// NaN values.
    pub nan_count: u64,
    /// Infinite values.
    pub inf_count: u64,
    /// Largest finite |value|.
    pub max_abs: f64,
}

/// Rates derived from the median.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Derived {
    /// alloc_bytes per second of runtime.
    pub alloc_rate_bytes_per_sec: f64,
    /// Fraction of time outside GC (always 1).
    pub gc_throughput: f64,
    /// Counted FLOPs per second, in GFLOP/s.
    pub gflops: f64,
    /// `gflops` as a percentage of the measured FMA peak of the cores the
    /// scenario can use (single-core peak × `cores_used`).
    pub pct_of_peak: f64,
    /// Cores the scenario runs on: its threads, at most the hardware threads.
    pub cores_used: usize,
}

/// Ratios between scenarios.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteDerived {
    /// throughput(parallel_T{2,4}) / throughput(parallel_T1).
    pub speedup_forward_t2: Option<f64>,
    /// As above, T4.
    pub speedup_forward_t4: Option<f64>,
    /// throughput(parallel_train_T{2,4}) / throughput(parallel_train_T1).
    pub speedup_train_t2: Option<f64>,
    /// As above, T4.
    pub speedup_train_t4: Option<f64>,
    /// median(dispatch_cold) / median(dispatch_warm).
    pub cold_warm_ratio: Option<f64>,
    /// median(mem_train_step, B2 S8) / median(dispatch_warm, forward B2 S32).
    pub train_forward_ratio: Option<f64>,
}

/// The scenarios whose id matches `pattern` (`*` matches any run of characters).
pub fn select(pattern: &str) -> Vec<Scenario> {
    scenarios::all()
        .into_iter()
        .filter(|s| glob(pattern, &s.id))
        .collect()
}

/// `*`-wildcard matching.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// Runs one scenario in this process and measures it. The peak RSS is this
/// process's, so the suite calls this in a child per scenario.
pub fn measure(scenario: &Scenario, options: Options) -> Result<ScenarioResult> {
    // Counted before `prepare`, which may pin this thread to one core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    kernels::set_threads(options.threads);
    let mut runner = scenario.prepare(options.seed)?;
    for _ in 0..options.warmup {
        runner.run()?;
    }
    let probe = Instant::now();
    runner.run()?;
    let once = probe.elapsed();
    // Repeat runs shorter than a millisecond so each trial lasts about one.
    let reps = if once < Duration::from_millis(1) {
        (1_000_000 / once.as_nanos().max(1)) as usize + 1
    } else {
        1
    };
    let (mut wall, mut cpu) = (
        Vec::with_capacity(options.trials),
        Vec::with_capacity(options.trials),
    );
    let alloc_before = kernels::allocated_bytes();
    for _ in 0..options.trials {
        let cpu_start = cpu_time_ns();
        let start = Instant::now();
        for _ in 0..reps {
            runner.run()?;
        }
        wall.push(start.elapsed().as_nanos() as u64 / reps as u64);
        cpu.push(cpu_time_ns().saturating_sub(cpu_start) / reps as u64);
    }
    let runs = (options.trials * reps).max(1) as u64;
    let alloc_bytes = (kernels::allocated_bytes() - alloc_before) / runs;
    let output = runner.output();
    drop(runner);
    let stats = Stats::of(&wall);
    let median_s = stats.median as f64 / 1e9;
    let gflops = scenario.flops() / median_s / 1e9;
    Ok(ScenarioResult {
        id: scenario.id.clone(),
        axis: scenario.axis.into(),
        params: scenario.params(),
        warmup_runs: options.warmup,
        trial_runs: options.trials,
        reps_per_trial: reps,
        cpu_median_ns: Stats::of(&cpu).median,
        timings_ns: wall,
        cpu_times_ns: cpu,
        median_ns: stats.median,
        p95_ns: stats.p95,
        min_ns: stats.min,
        max_ns: stats.max,
        iqr_ns: stats.iqr,
        memory: Memory {
            peak_rss_bytes: peak_rss_bytes(),
            alloc_bytes,
        },
        gc: Gc {
            total_gc_time_ns: 0,
            gc_pause_count: 0,
        },
        numerical: Numerical {
            nan_count: output.iter().filter(|v| v.is_nan()).count() as u64,
            inf_count: output.iter().filter(|v| v.is_infinite()).count() as u64,
            max_abs: output
                .iter()
                .filter(|v| v.is_finite())
                .fold(0.0f64, |m, v| m.max(f64::from(v.abs()))),
        },
        throughput_tokens_per_sec: scenario.tokens() as f64 / median_s,
        derived: Derived {
            alloc_rate_bytes_per_sec: alloc_bytes as f64 / median_s,
            gc_throughput: 1.0,
            gflops,
            pct_of_peak: 0.0,
            cores_used: scenario.threads().max(options.threads).min(cores),
        },
    })
}

/// Order statistics of a sample (nearest-rank percentiles).
struct Stats {
    median: u64,
    p95: u64,
    min: u64,
    max: u64,
    iqr: u64,
}

impl Stats {
    fn of(sample: &[u64]) -> Self {
        let mut s = sample.to_vec();
        s.sort_unstable();
        if s.is_empty() {
            s.push(0);
        }
        let at = |q: f64| s[((q * (s.len() - 1) as f64).round() as usize).min(s.len() - 1)];
        let median = if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2
        };
        Stats {
            median,
            p95: at(0.95),
            min: s[0],
            max: s[s.len() - 1],
            iqr: at(0.75) - at(0.25),
        }
    }
}

/// User + system CPU time of this process (all threads), from getrusage.
fn cpu_time_ns() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |u| {
        let (user, system) = (u.user_time(), u.system_time());
        let ns = |t: nix::sys::time::TimeVal| {
            t.tv_sec() as u64 * 1_000_000_000 + t.tv_usec() as u64 * 1000
        };
        ns(user) + ns(system)
    })
}

/// Peak resident set size of this process in bytes (getrusage reports KiB).
fn peak_rss_bytes() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |u| u.max_rss() as u64 * 1024)
}

/// Fills in what depends on the whole run: % of peak and the suite ratios.
pub fn finish(metadata: Metadata, mut results: Vec<ScenarioResult>) -> Result<Report> {
    for r in &mut results {
        let peak = metadata.fma_peak_gflops * r.derived.cores_used.max(1) as f64;
        r.derived.pct_of_peak = 100.0 * r.derived.gflops / peak;
    }
    let find = |id: &str| results.iter().find(|r| r.id == id);
    let throughput_ratio = |a: &str, b: &str| {
        Some(find(a)?.throughput_tokens_per_sec / find(b)?.throughput_tokens_per_sec)
    };
    let time_ratio = |a: &str, b: &str| Some(find(a)?.median_ns as f64 / find(b)?.median_ns as f64);
    let derived = SuiteDerived {
        speedup_forward_t2: throughput_ratio("parallel_T2", "parallel_T1"),
        speedup_forward_t4: throughput_ratio("parallel_T4", "parallel_T1"),
        speedup_train_t2: throughput_ratio("parallel_train_T2", "parallel_train_T1"),
        speedup_train_t4: throughput_ratio("parallel_train_T4", "parallel_train_T1"),
        cold_warm_ratio: time_ratio("dispatch_cold", "dispatch_warm"),
        train_forward_ratio: time_ratio("mem_train_step", "dispatch_warm"),
    };
    let static_metrics = serde_json::from_str(STATIC_METRICS).map_err(|e| MoeError::Json {
        path: "static_metrics.json".into(),
        reason: e.to_string(),
    })?;
    Ok(Report {
        metadata,
        static_metrics,
        scenarios: results,
        derived,
    })
}

/// Metadata of this machine and run.
pub fn metadata(options: Options, fma_peak_gflops: f64, command: String) -> Metadata {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let os_release = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        });
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|k| k.trim().to_string());
    let os = match (os_release, kernel) {
        (Some(name), Ok(kernel)) => format!("{name}, Linux {kernel}"),
        (Some(name), Err(_)) => name,
        (None, _) => std::env::consts::OS.to_string(),
    };
    Metadata {
        language: "rust".into(),
        language_version: env!("MOE_RUSTC_VERSION").into(),
        os,
        cpu_model,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        timestamp: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        n_trials: options.trials,
        n_warmup: options.warmup,
        seed: options.seed,
        fma_peak_gflops,
        intra_op_threads: options.threads,
        command,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_a_shell() {
        assert!(glob("*", "kernel_matmul"));
        assert!(glob("kernel_*", "kernel_matmul"));
        assert!(glob("*_T2", "parallel_train_T2"));
        assert!(glob("mem_*_8", "mem_scale_batch_8"));
        assert!(!glob("mem_*_8", "mem_scale_batch_1"));
        assert!(!glob("kernel", "kernel_matmul"));
        assert_eq!(select("parallel*").len(), 6);
        assert_eq!(select("*").len(), 22);
    }

    #[test]
    fn order_statistics() {
        let s = Stats::of(&[5, 1, 4, 2, 3]);
        assert_eq!((s.median, s.min, s.max, s.p95, s.iqr), (3, 1, 5, 5, 2));
        assert_eq!(Stats::of(&[1, 2, 3, 4]).median, 2);
    }

    #[test]
    fn a_kernel_scenario_measures_complete_results() {
        let scenario = select("kernel_softmax").remove(0);
        let options = Options {
            trials: 3,
            warmup: 1,
            ..Options::default()
        };
        let r = measure(&scenario, options).unwrap();
        assert_eq!(r.timings_ns.len(), 3);
        assert!(r.reps_per_trial > 1, "sub-millisecond kernels are repeated");
        assert!(r.median_ns > 0 && r.min_ns <= r.median_ns && r.median_ns <= r.max_ns);
        assert!(r.derived.gflops > 0.0 && r.memory.peak_rss_bytes > 0);
        assert_eq!(r.numerical.nan_count + r.numerical.inf_count, 0);
        let report = finish(metadata(options, 100.0, "test".into()), vec![r]).unwrap();
        assert!(report.scenarios[0].derived.pct_of_peak > 0.0);
        assert!(report.static_metrics.sloc > 1000);
    }
}
