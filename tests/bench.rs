//! `moe bench --quick` produces complete, well-formed results (the timings
//! themselves are never asserted: speed is shown by the suite, not tested).

use std::process::Command;

const MOE: &str = env!("CARGO_BIN_EXE_moe");

#[test]
fn the_quick_suite_writes_complete_json_markdown_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let (json, md, plots) = (
        dir.path().join("r.json"),
        dir.path().join("r.md"),
        dir.path().join("plots"),
    );
    let out = Command::new(MOE)
        .args(["bench", "--quick", "--json"])
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
        .arg("--plots")
        .arg(&plots)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let metadata = &report["metadata"];
    for key in [
        "language",
        "language_version",
        "os",
        "cpu_model",
        "threads",
        "timestamp",
        "n_trials",
        "n_warmup",
        "seed",
    ] {
        assert!(!metadata[key].is_null(), "metadata.{key} missing");
    }
    assert!(metadata["fma_peak_gflops"].as_f64().unwrap() > 0.0);
    for key in ["source_gzip_bytes", "sloc", "function_count"] {
        assert!(report["static_metrics"][key].as_u64().unwrap() > 0, "{key}");
    }
    let scenarios = report["scenarios"].as_array().unwrap();
    // CONTRACT §10's 22, then issue 23's large-batch step on two threads.
    assert_eq!(scenarios.len(), 23);
    assert_eq!(scenarios[22]["id"], "train_large_batch");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(scenarios[22]["derived"]["cores_used"], cores.min(2));
    for s in scenarios {
        let id = s["id"].as_str().unwrap();
        for key in [
            "axis",
            "params",
            "warmup_runs",
            "trial_runs",
            "timings_ns",
            "cpu_times_ns",
            "median_ns",
            "p95_ns",
            "min_ns",
            "max_ns",
            "iqr_ns",
            "cpu_median_ns",
            "throughput_tokens_per_sec",
        ] {
            assert!(!s[key].is_null(), "{id}: {key} missing");
        }
        assert_eq!(s["timings_ns"].as_array().unwrap().len(), 3, "{id}");
        assert!(s["median_ns"].as_u64().unwrap() > 0, "{id}");
        assert!(
            s["memory"]["peak_rss_bytes"].as_u64().unwrap() > 1_000_000,
            "{id}: RSS in bytes"
        );
        assert!(!s["memory"]["alloc_bytes"].is_null(), "{id}");
        assert_eq!(s["gc"]["total_gc_time_ns"], 0);
        assert_eq!(s["gc"]["gc_pause_count"], 0);
        assert_eq!(s["numerical"]["nan_count"], 0, "{id}");
        assert_eq!(s["numerical"]["inf_count"], 0, "{id}");
        for key in [
            "alloc_rate_bytes_per_sec",
            "gc_throughput",
            "gflops",
            "pct_of_peak",
        ] {
            let v = s["derived"][key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite(), "{id}: derived.{key} = {v}");
        }
        assert!(s["derived"]["gflops"].as_f64().unwrap() > 0.0, "{id}");
    }
    for key in [
        "speedup_forward_t2",
        "speedup_train_t2",
        "cold_warm_ratio",
        "train_forward_ratio",
    ] {
        assert!(report["derived"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    let markdown = std::fs::read_to_string(&md).unwrap();
    assert!(markdown.contains("## Summary") && markdown.contains("scale_train_256"));
    for plot in [
        "batch_scaling.svg",
        "sequence_scaling.svg",
        "parallel_speedup.svg",
        "pct_of_peak.svg",
    ] {
        let svg = std::fs::read_to_string(plots.join(plot)).unwrap();
        assert!(svg.starts_with("<svg"), "{plot}");
    }
    // The report regenerates from the JSON alone.
    let again = Command::new(MOE)
        .args(["bench", "--from"])
        .arg(&json)
        .arg("--markdown")
        .arg(dir.path().join("again.md"))
        .arg("--plots")
        .arg(&plots)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("again.md")).unwrap(),
        markdown
    );
}

#[test]
fn unknown_scenarios_are_an_error() {
    let out = Command::new(MOE)
        .args(["bench", "--scenario", "nope*"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no benchmark scenario"));
}
