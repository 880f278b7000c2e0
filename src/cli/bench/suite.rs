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

use super::scenarios::{self, Scenario, Traffic};
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
    /// The SIMD level the kernels ran at (`MOE_SIMD`; empty in runs from
    /// before levels existed, which were AVX-512 where the CPU had it).
    #[serde(default)]
    pub simd_level: String,
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
    /// Streaming bandwidth of one core from DRAM, in GB/s: the best
    /// AdamW-shaped pass (read p, g, m, v; write p, m, v) over buffers far
    /// larger than the last-level cache.
    #[serde(default)]
    pub stream_bandwidth_gbs: f64,
    /// The same pass over buffers that fit in cache, in GB/s.
    #[serde(default)]
    pub cache_bandwidth_gbs: f64,
    /// The DRAM pass split over every hardware thread, in GB/s: what the
    /// cores stream together (they share the memory controllers). Absent
    /// from runs before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_bandwidth_all_cores_gbs: Option<f64>,
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
    /// Roofline floor of one run, in ns: FLOPs ÷ peak and the overlappable
    /// bytes ÷ bandwidth, whichever is larger, plus the pure streaming phase's
    /// bytes ÷ bandwidth (absent for the cold start).
    #[serde(default)]
    pub floor_ns: Option<u64>,
    /// floor_ns as a percentage of the median.
    #[serde(default)]
    pub pct_of_floor: Option<f64>,
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

/// Runs per timed trial for a run that took `once`: runs shorter than a
/// millisecond are repeated so each trial lasts about one.
fn reps_per_trial(once: Duration) -> usize {
    if once < Duration::from_millis(1) {
        (1_000_000 / once.as_nanos().max(1)) as usize + 1
    } else {
        1
    }
}

/// Runs one scenario in this process and measures it. The peak RSS is this
/// process's, so the suite calls this in a child per scenario.
pub fn measure(scenario: &Scenario, options: Options) -> Result<ScenarioResult> {
    // Counted before `prepare`, which may pin this thread to one core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    kernels::set_threads(scenario.intra_op.unwrap_or(options.threads));
    let mut runner = scenario.prepare(options.seed)?;
    for _ in 0..options.warmup {
        runner.run()?;
    }
    let probe = Instant::now();
    runner.run()?;
    let reps = reps_per_trial(probe.elapsed());
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
            floor_ns: None,
            pct_of_floor: None,
            cores_used: scenario
                .intra_op
                .unwrap_or(scenario.threads().max(options.threads))
                .min(cores),
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
        let cores = r.derived.cores_used.max(1) as f64;
        let peak = metadata.fma_peak_gflops * cores;
        r.derived.pct_of_peak = 100.0 * r.derived.gflops / peak;
        let scenario = select(&r.id).into_iter().next();
        let traffic = scenario.as_ref().and_then(Scenario::traffic);
        if let (Some(scenario), Some(traffic)) = (scenario, traffic) {
            let floor = roofline_floor(&metadata, scenario.flops(), traffic, cores);
            r.derived.floor_ns = Some((floor * 1e9).round() as u64);
            r.derived.pct_of_floor = Some(100.0 * floor * 1e9 / r.median_ns.max(1) as f64);
        }
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

/// What the suite measures of the machine before the scenarios.
#[derive(Debug, Clone, Copy)]
pub struct Probes {
    /// Single-core FMA peak, GFLOP/s.
    pub fma_peak_gflops: f64,
    /// AdamW-shaped streaming from DRAM, GB/s.
    pub stream_bandwidth_gbs: f64,
    /// The same from cache, GB/s.
    pub cache_bandwidth_gbs: f64,
    /// The DRAM pass split over every hardware thread, GB/s (None on a
    /// single-core machine).
    pub stream_bandwidth_all_cores_gbs: Option<f64>,
}

impl Probes {
    /// Measures the bandwidths (about two seconds) — on this core, and from
    /// DRAM with the pass split over `cores` threads — beside an already
    /// measured FMA peak.
    pub fn measure(fma_peak_gflops: f64, cores: usize) -> Self {
        // 4 × 64 MB: far past any last-level cache.
        let dram = || adamw_bandwidth_gbs(16 << 20, Duration::from_millis(800));
        let stream_bandwidth_gbs = dram();
        // 4 × 128 KB: inside L2.
        let cache_bandwidth_gbs = adamw_bandwidth_gbs(32 << 10, Duration::from_millis(300));
        let stream_bandwidth_all_cores_gbs = (cores > 1).then(|| {
            let before = kernels::threads();
            kernels::set_threads(cores);
            let all = dram();
            kernels::set_threads(before);
            all
        });
        Probes {
            fma_peak_gflops,
            stream_bandwidth_gbs,
            cache_bandwidth_gbs,
            stream_bandwidth_all_cores_gbs,
        }
    }
}

/// Working sets up to this many bytes stream at the cache bandwidth.
pub const CACHE_RESIDENT_BYTES: f64 = 16e6;

/// The roofline floor in seconds of a run of `flops` and `traffic` on `cores`
/// cores, each with the measured single-core peak, and with the measured
/// bandwidth times `cores` — from DRAM at most what all cores were measured
/// to stream together, as they share it (still optimistic for fewer cores
/// than that):
///   max(FLOPs / peak, overlapped bytes / bw) + streaming bytes / bw
fn roofline_floor(metadata: &Metadata, flops: f64, traffic: Traffic, cores: f64) -> f64 {
    let gbs = if traffic.working_set <= CACHE_RESIDENT_BYTES {
        metadata.cache_bandwidth_gbs * cores
    } else {
        let one = metadata.stream_bandwidth_gbs;
        let shared = metadata
            .stream_bandwidth_all_cores_gbs
            .unwrap_or(f64::INFINITY);
        (one * cores).min(shared.max(one))
    };
    let bandwidth = gbs * 1e9;
    let arithmetic = flops / (metadata.fma_peak_gflops * 1e9 * cores);
    arithmetic.max(traffic.overlapped / bandwidth) + traffic.streaming / bandwidth
}

/// Best GB/s of an AdamW-shaped pass (the project's own AdamW kernel, on
/// the intra-op threads in effect: read p, g, m, v; write p, m, v — 28 bytes
/// per parameter) over `floats` parameters, repeated for about `budget`.
pub fn adamw_bandwidth_gbs(floats: usize, budget: Duration) -> f64 {
    let (mut p, g) = (vec![0.5f32; floats], vec![1e-3f32; floats]);
    let (mut m, mut v) = (vec![0.0f32; floats], vec![0.0f32; floats]);
    let step = kernels::AdamWStep {
        decay: 1e-7,
        ..kernels::AdamWStep::new((0.9, 0.95), 1e-8, 1e-6, 1)
    };
    let (start, mut best) = (Instant::now(), f64::INFINITY);
    while start.elapsed() < budget || best.is_infinite() {
        let pass = Instant::now();
        kernels::adamw_tensors(std::iter::once(kernels::TensorStep {
            p: &mut p,
            m: &mut m,
            v: &mut v,
            grad: kernels::TensorGrad::Stored(&g),
            step,
        }));
        best = best.min(pass.elapsed().as_secs_f64());
    }
    std::hint::black_box(&p);
    28.0 * floats as f64 / best / 1e9
}

/// Metadata of this machine and run.
pub fn metadata(options: Options, probes: Probes, command: String) -> Metadata {
    let cpu_model = kernels::cpu_model();
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
        simd_level: kernels::simd_level().name().into(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        timestamp: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        n_trials: options.trials,
        n_warmup: options.warmup,
        seed: options.seed,
        fma_peak_gflops: probes.fma_peak_gflops,
        stream_bandwidth_gbs: probes.stream_bandwidth_gbs,
        cache_bandwidth_gbs: probes.cache_bandwidth_gbs,
        stream_bandwidth_all_cores_gbs: probes.stream_bandwidth_all_cores_gbs,
        intra_op_threads: options.threads,
        command,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rosetta_moe::ModelConfig;

    #[test]
    fn glob_matches_like_a_shell() {
        assert!(glob("*", "kernel_matmul"));
        assert!(glob("kernel_*", "kernel_matmul"));
        assert!(glob("*_T2", "parallel_train_T2"));
        assert!(glob("mem_*_8", "mem_scale_batch_8"));
        assert!(!glob("mem_*_8", "mem_scale_batch_1"));
        assert!(!glob("kernel", "kernel_matmul"));
        assert_eq!(select("parallel*").len(), 6);
        assert_eq!(select("*").len(), 23);
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
        assert!(r.reps_per_trial >= 1);
        assert!(r.median_ns > 0 && r.min_ns <= r.median_ns && r.median_ns <= r.max_ns);
        assert!(r.derived.gflops > 0.0 && r.memory.peak_rss_bytes > 0);
        assert_eq!(r.numerical.nan_count + r.numerical.inf_count, 0);
        let report = finish(metadata(options, PROBES, "test".into()), vec![r]).unwrap();
        assert!(report.scenarios[0].derived.pct_of_peak > 0.0);
        assert!(report.scenarios[0].derived.pct_of_floor.unwrap() > 0.0);
        assert!(report.static_metrics.sloc > 1000);
    }

    #[test]
    fn sub_millisecond_runs_are_repeated_to_fill_a_millisecond() {
        // (How long one run takes is the machine's business, so the rule is
        // tested on given durations, not on a measured kernel.)
        assert_eq!(reps_per_trial(Duration::from_micros(100)), 11);
        assert_eq!(reps_per_trial(Duration::from_nanos(999_999)), 2);
        assert_eq!(reps_per_trial(Duration::from_millis(1)), 1);
        assert_eq!(reps_per_trial(Duration::ZERO), 1_000_001);
    }

    const PROBES: Probes = Probes {
        fma_peak_gflops: 100.0,
        stream_bandwidth_gbs: 40.0,
        cache_bandwidth_gbs: 200.0,
        stream_bandwidth_all_cores_gbs: Some(60.0),
    };

    #[test]
    fn roofline_floors_add_the_adamw_pass_to_the_larger_of_arithmetic_and_streaming() {
        let meta = metadata(Options::default(), PROBES, "test".into());
        let floor = |id: &str, cores: f64| {
            let s = select(id).remove(0);
            roofline_floor(&meta, s.flops(), s.traffic().unwrap(), cores)
        };
        // Small train step: P = 7,134,464 parameters, 28.5 MB of weights (DRAM).
        // Arithmetic 358,875,136 FLOP / 100 GFLOP/s = 3.589 ms > 8P bytes / 40 GB/s
        // = 1.427 ms; then AdamW's 24P bytes / 40 GB/s = 4.281 ms.
        let small = floor("scale_train_256", 1.0);
        assert!(
            (small - (3.588_751e-3 + 4.280_678e-3)).abs() < 1e-8,
            "{small}"
        );
        // Two cores halve the arithmetic; they stream from DRAM at the 60 GB/s
        // measured with both, not 2 × 40.
        let two = floor("scale_train_256", 2.0);
        assert!(
            (two - (3.588_751e-3 / 2.0 + 4.280_678e-3 * 40.0 / 60.0)).abs() < 1e-8,
            "{two}"
        );
        // Without an all-cores figure (older runs), bandwidth scales with cores.
        let older = Metadata {
            stream_bandwidth_all_cores_gbs: None,
            ..meta.clone()
        };
        let s = select("scale_train_256").remove(0);
        let unshared = roofline_floor(&older, s.flops(), s.traffic().unwrap(), 2.0);
        assert!((unshared - small / 2.0).abs() < 1e-9);
        // Tiny's 6.5 MB working set streams from cache: 24P / 200 GB/s.
        let p = ModelConfig::tiny().param_count() as f64;
        let tiny = floor("mem_train_step", 1.0);
        let arithmetic: f64 = 27_197_440.0 / 100e9;
        assert!((tiny - (arithmetic.max(8.0 * p / 200e9) + 24.0 * p / 200e9)).abs() < 1e-12);
        // A forward has no streaming phase: arithmetic or weights, whichever is slower.
        let fwd = floor("scale_forward_256", 1.0);
        assert!((fwd - 481_820_672.0 / 100e9).abs() < 1e-12);
        assert!(select("dispatch_cold")[0].traffic().is_none());
    }
}
