//! The `moe` command line: training runs, resume, interruption and their errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const MOE: &str = env!("CARGO_BIN_EXE_moe");

fn moe(args: &[&str]) -> Output {
    Command::new(MOE).args(args).output().expect("moe runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small config and text so each run takes well under a second.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = r#"{"hidden_dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
            "n_experts": 4, "top_k": 2, "ffn_dim": 64, "vocab_size": 300, "max_seq_len": 64,
            "rope_base": 10000.0, "rope_alpha": 1.0}"#;
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let text: String = (0..600)
            .map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog.\n"))
            .collect();
        std::fs::write(dir.path().join("text.txt"), text).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `moe train` on the fixture's text and config into `out`, plus `extra` flags.
    fn train(&self, out: &str, extra: &[&str]) -> Output {
        let (data, config, out) = (self.s("text.txt"), self.s("config.json"), self.s(out));
        let mut args = vec![
            "train", "--data", &data, "--config", &config, "--out", &out, "--batch", "2", "--seq",
            "16",
        ];
        args.extend_from_slice(extra);
        moe(&args)
    }
}

fn file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_command_has_help() {
    for cmd in [
        &["--help"][..],
        &["train", "--help"],
        &["generate", "--help"],
        &["init", "--help"],
        &["dump", "--help"],
        &["convergence", "--help"],
    ] {
        let out = moe(cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{cmd:?}"
        );
    }
}

#[test]
fn a_run_trains_saves_and_generates() {
    let f = Fixture::new();
    let out = f.train("run", &["--steps", "30", "--eval-every", "10", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["val_bits_per_byte"].as_f64().unwrap() > 0.0);
    for name in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.svg",
        "summary.json",
    ] {
        assert!(f.path("run").join(name).exists(), "{name} missing");
    }
    let metrics = String::from_utf8(file(&f.path("run/metrics.jsonl"))).unwrap();
    assert_eq!(metrics.lines().count(), 30);
    assert!(metrics.lines().nth(9).unwrap().contains("val_loss"));

    let run = f.s("run");
    let generated = moe(&[
        "generate",
        "--checkpoint",
        &run,
        "--prompt",
        "the quick",
        "--max-new",
        "12",
        "--json",
    ]);
    assert!(generated.status.success(), "{}", stderr(&generated));
    let report: serde_json::Value = serde_json::from_slice(&generated.stdout).unwrap();
    assert_eq!(report["new_tokens"], 12);
    let again = moe(&[
        "generate",
        "--checkpoint",
        &run,
        "--prompt",
        "the quick",
        "--max-new",
        "12",
        "--json",
    ]);
    let report2: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        report["tokens"], report2["tokens"],
        "same seed, same sample"
    );
    let streamed = moe(&[
        "generate",
        "--checkpoint",
        &run,
        "--prompt",
        "the quick",
        "--max-new",
        "12",
    ]);
    assert!(String::from_utf8_lossy(&streamed.stdout).starts_with("the quick"));
}

#[test]
fn resuming_is_bit_identical_to_training_straight_through() {
    let f = Fixture::new();
    assert!(
        f.train("straight", &["--steps", "20", "--warmup", "3"])
            .status
            .success()
    );
    // Stop at step 10 of the same 20-step schedule, then continue.
    assert!(
        f.train(
            "halves",
            &["--steps", "10", "--schedule-steps", "20", "--warmup", "3"]
        )
        .status
        .success()
    );
    let (data, halves) = (f.s("text.txt"), f.s("halves"));
    let out = moe(&[
        "train", "--data", &data, "--resume", &halves, "--steps", "20",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for name in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            file(&f.path("straight").join(name)) == file(&f.path("halves").join(name)),
            "{name} differs"
        );
    }
    let metrics = String::from_utf8(file(&f.path("halves/metrics.jsonl"))).unwrap();
    assert_eq!(metrics.lines().count(), 20);
}

#[test]
fn bad_data_is_a_clear_error() {
    let f = Fixture::new();
    std::fs::write(f.path("empty.txt"), "").unwrap();
    std::fs::write(f.path("short.txt"), "too short").unwrap();
    let config = f.s("config.json");
    for (data, expect) in [
        ("missing.txt", "No such file"),
        ("empty.txt", "empty"),
        ("short.txt", "tokens; one window needs"),
    ] {
        let (data, out) = (f.s(data), f.s("out"));
        let run = moe(&[
            "train", "--data", &data, "--config", &config, "--out", &out, "--seq", "32",
        ]);
        assert_eq!(run.status.code(), Some(1), "{data}");
        assert!(stderr(&run).contains(expect), "{data}: {}", stderr(&run));
    }
    let dir = f.s("");
    let run = moe(&[
        "train",
        "--data",
        &dir,
        "--config",
        &config,
        "--out",
        &f.s("out"),
    ]);
    assert_eq!(run.status.code(), Some(1));
}

#[test]
fn an_output_directory_holding_another_run_is_refused_unless_forced() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "5"]).status.success());
    let before = file(&f.path("run/model.safetensors"));
    let again = f.train("run", &["--steps", "5", "--seed", "9"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(
        file(&f.path("run/model.safetensors")),
        before,
        "nothing lost"
    );
    assert!(
        f.train("run", &["--steps", "5", "--seed", "9", "--force"])
            .status
            .success()
    );
    assert_ne!(file(&f.path("run/model.safetensors")), before);
}

#[test]
fn resuming_with_another_config_data_or_tokenizer_is_refused() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "5"]).status.success());
    let (data, run) = (f.s("text.txt"), f.s("run"));
    let other_config = moe(&[
        "train", "--data", &data, "--resume", &run, "--steps", "9", "--config", "tiny",
    ]);
    assert_eq!(other_config.status.code(), Some(1));
    assert!(
        stderr(&other_config).contains("config"),
        "{}",
        stderr(&other_config)
    );

    std::fs::write(f.path("other.txt"), file(&f.path("text.txt")).repeat(2)).unwrap();
    let other = f.s("other.txt");
    let other_data = moe(&["train", "--data", &other, "--resume", &run, "--steps", "9"]);
    assert_eq!(other_data.status.code(), Some(1));
    assert!(
        stderr(&other_data).contains("another text"),
        "{}",
        stderr(&other_data)
    );

    let other_seq = moe(&[
        "train", "--data", &data, "--resume", &run, "--steps", "9", "--seq", "8",
    ]);
    assert_eq!(other_seq.status.code(), Some(1));

    // A tokenizer with more tokens than the model's vocabulary.
    let big = f.s("big");
    assert!(
        moe(&[
            "train", "--config", "tiny", "--out", &big, "--steps", "1", "--data", &data
        ])
        .status
        .success()
    );
    std::fs::copy(f.path("big/tokenizer.json"), f.path("run/tokenizer.json")).unwrap();
    let other_tok = moe(&["train", "--data", &data, "--resume", &run, "--steps", "9"]);
    assert_eq!(other_tok.status.code(), Some(1));
    assert!(
        stderr(&other_tok).contains("tokenizer.json"),
        "{}",
        stderr(&other_tok)
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let f = Fixture::new();
    let (data, config, out) = (f.s("text.txt"), f.s("config.json"), f.s("run"));
    let child = Command::new(MOE)
        .args([
            "train", "--data", &data, "--config", &config, "--out", &out, "--steps", "1000000",
            "--batch", "2", "--seq", "16",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = f.path("run/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(stderr(&output).contains("--resume"), "{}", stderr(&output));
    let state: serde_json::Value =
        serde_json::from_slice(&file(&f.path("run/state.json"))).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 20);
    let resumed = moe(&[
        "train",
        "--data",
        &data,
        "--resume",
        &out,
        "--steps",
        &(step + 3).to_string(),
    ]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
}

#[test]
fn generate_refuses_bad_requests() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "2"]).status.success());
    let run = f.s("run");
    let long_prompt = "word ".repeat(200);
    for (args, expect) in [
        (vec!["--prompt", ""], "empty"),
        (vec!["--prompt", &long_prompt], "exceeds max_seq_len"),
        (
            vec!["--prompt", "hi", "--max-new", "100"],
            "exceeds max_seq_len",
        ),
        (
            vec!["--prompt", "hi", "--strategy", "top-p", "--top-p", "1.5"],
            "outside (0, 1]",
        ),
        (
            vec!["--prompt", "hi", "--strategy", "top-k", "--top-k", "5000"],
            "exceeds vocab_size",
        ),
        (
            vec![
                "--prompt",
                "hi",
                "--strategy",
                "temperature",
                "--temperature=-1",
            ],
            "must be finite and ≥ 0",
        ),
    ] {
        let mut full = vec!["generate", "--checkpoint", &run];
        full.extend(args.iter().copied());
        let out = moe(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    let init = f.s("init");
    assert!(moe(&["init", "--out", &init]).status.success());
    let out = moe(&["generate", "--checkpoint", &init, "--prompt", "hi"]);
    assert!(stderr(&out).contains("tokenizer.json"), "{}", stderr(&out));
}
