//! The `moe` command line: training runs, resume, interruption and their errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rosetta_moe::ModelConfig;

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
        &["eval", "--help"],
        &["export", "--help"],
        &["bench", "--help"],
        &["stability", "--help"],
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

/// The JSON report of a successful `moe` command.
fn report(args: &[&str]) -> serde_json::Value {
    let out = moe(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn threads_default_to_every_core_and_never_change_the_results() {
    let f = Fixture::new();
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rosetta_moe::kernels::MAX_THREADS);
    let mut summaries = Vec::new();
    for (dir, threads) in [("t0", None), ("t1", Some("1")), ("t2", Some("2"))] {
        let mut flags = vec!["--steps", "6", "--json"];
        flags.extend(threads.map(|n| ["--threads", n]).into_iter().flatten());
        let out = f.train(dir, &flags);
        assert!(out.status.success(), "{}", stderr(&out));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let expected = threads.map_or(cores, |n| n.parse().unwrap());
        assert_eq!(summary["threads"], expected, "{dir}");
        summaries.push(summary);
    }
    assert_eq!(summaries[1]["val_loss"], summaries[2]["val_loss"]);
    assert_same_run(&f, "t1", "t2", "1 against 2 threads");
    let (run, data) = (f.s("t1"), f.s("text.txt"));
    let generate = |threads: Option<&str>| {
        let mut args = vec![
            "generate",
            "--checkpoint",
            &run,
            "--prompt",
            "the quick",
            "--max-new",
            "40",
            "--json",
        ];
        args.extend(threads.map(|n| ["--threads", n]).into_iter().flatten());
        report(&args)
    };
    let evaluate = |threads: Option<&str>| {
        let mut args = vec!["eval", "--checkpoint", &run, "--data", &data, "--json"];
        args.extend(threads.map(|n| ["--threads", n]).into_iter().flatten());
        report(&args)
    };
    let (g0, g1, g2) = (generate(None), generate(Some("1")), generate(Some("2")));
    let (e0, e1, e2) = (evaluate(None), evaluate(Some("1")), evaluate(Some("2")));
    for (report, threads) in [
        (&g0, cores),
        (&g1, 1),
        (&g2, 2),
        (&e0, cores),
        (&e1, 1),
        (&e2, 2),
    ] {
        assert_eq!(report["threads"], threads, "{report}");
    }
    assert_eq!(g1["tokens"], g2["tokens"]);
    assert_eq!(g0["tokens"], g1["tokens"]);
    for key in ["loss", "bits_per_byte", "tokens"] {
        assert_eq!(e1[key], e2[key], "{key}");
        assert_eq!(e0[key], e1[key], "{key}");
    }
    for command in [
        vec!["generate", "--checkpoint", &run, "--prompt", "a"],
        vec!["eval", "--checkpoint", &run, "--data", &data],
        vec!["train", "--data", &data, "--resume", &run, "--steps", "9"],
    ] {
        for bad in ["0", "9"] {
            let out = moe(&[&command[..], &["--threads", bad]].concat());
            assert_eq!(out.status.code(), Some(2), "{command:?} --threads {bad}");
        }
    }
}

/// The lines of a run's `metrics.jsonl`.
fn metrics_lines(dir: &Path) -> Vec<serde_json::Value> {
    String::from_utf8(file(&dir.join("metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_timed_run_ends_its_schedule_at_the_floor_records_its_clock_and_resumes_its_budget() {
    let f = Fixture::new();
    let flags = [
        "--time",
        "2s",
        "--warmup",
        "5",
        "--eval-every",
        "20",
        "--json",
    ];
    let out = f.train("run", &flags);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["stopped_by"], "time");
    assert_eq!(summary["time_budget"]["seconds"], 2.0);
    let lines = metrics_lines(&f.path("run"));
    let last = lines.last().unwrap();
    assert_eq!(summary["steps"], last["step"]);
    assert_eq!(summary["time_budget"]["schedule_steps"], last["step"]);
    // The schedule's last step is the run's, whatever the machine's pace:
    // its rate is the floor.
    let floor = 0.1 * 1e-3;
    let at_floor = |lr: f64| (lr - floor).abs() <= 1e-6 * floor;
    let lr = last["lr"].as_f64().unwrap();
    assert!(at_floor(lr), "last lr {lr}");
    // Every line carries the clock; every evaluation its own time, in the
    // summary too.
    let clocks: Vec<f64> = lines
        .iter()
        .map(|l| l["seconds"].as_f64().unwrap())
        .collect();
    assert!(clocks.windows(2).all(|w| w[0] <= w[1]) && clocks[0] > 0.0);
    let evaluated: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("val_loss").is_some())
        .collect();
    assert!(
        evaluated
            .iter()
            .all(|l| l["eval_seconds"].as_f64().unwrap() > 0.0)
    );
    let evaluations = summary["evaluations"].as_array().unwrap();
    assert_eq!(evaluations.len(), evaluated.len());
    assert_eq!(evaluations.last().unwrap()["step"], last["step"]);
    assert_eq!(evaluations[0]["seconds"], evaluated[0]["seconds"]);
    let state: serde_json::Value =
        serde_json::from_slice(&file(&f.path("run/state.json"))).unwrap();
    assert_eq!(state["data"]["clock"]["budget_secs"], 2.0);
    assert_eq!(
        state["data"]["clock"]["elapsed_secs"],
        summary["training_seconds"]
    );

    // Resuming continues the same budget (spent) unless --time sets a new total.
    let (data, run) = (f.s("text.txt"), f.s("run"));
    let (code, err) = resume_run(&f, "900");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("time budget; extend it with --time"), "{err}");
    let spent = moe(&["train", "--data", &data, "--resume", &run]);
    assert_eq!(spent.status.code(), Some(1), "{}", stderr(&spent));
    assert!(
        stderr(&spent).contains("already used"),
        "{}",
        stderr(&spent)
    );
    let more = report(&[
        "train", "--data", &data, "--resume", &run, "--time", "3s", "--json",
    ]);
    assert_eq!(more["time_budget"]["seconds"], 3.0);
    assert!(more["steps"].as_u64() > last["step"].as_u64());
    let after = metrics_lines(&f.path("run"));
    assert_eq!(&after[..lines.len()], &lines[..]);
    assert!(after[lines.len()]["seconds"].as_f64() > last["seconds"].as_f64());
    assert!(more["evaluations"].as_array().unwrap().len() > evaluations.len());
    let lr = after.last().unwrap()["lr"].as_f64().unwrap();
    assert!(at_floor(lr), "last lr {lr}");

    // --time and --steps are exclusive; a budget is longer than zero; a run
    // counted in steps stays so.
    for bad in [
        &["--time", "1s", "--steps", "5"][..],
        &["--time", "0s"],
        &["--time", "soon"],
    ] {
        let out = f.train("other", bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }
    assert!(f.train("steps", &["--steps", "2"]).status.success());
    let steps = f.s("steps");
    let out = moe(&["train", "--data", &data, "--resume", &steps, "--time", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("counts steps"), "{}", stderr(&out));
}

#[test]
fn without_data_it_trains_on_tiny_shakespeare_and_the_source_corpus_is_a_flag() {
    let f = Fixture::new();
    let config = f.s("config.json");
    for (corpus, source) in [
        (None, "built-in:shakespeare"),
        (Some("source"), "built-in:source"),
    ] {
        let out = f.s(source);
        let mut args = vec![
            "train", "--config", &config, "--out", &out, "--steps", "2", "--batch", "2", "--seq",
            "16",
        ];
        args.extend(corpus.map(|c| ["--corpus", c]).into_iter().flatten());
        let trained = moe(&args);
        assert!(trained.status.success(), "{}", stderr(&trained));
        assert!(
            String::from_utf8_lossy(&trained.stdout).contains(&format!("on {source} (")),
            "{}",
            String::from_utf8_lossy(&trained.stdout)
        );
        let state: serde_json::Value =
            serde_json::from_slice(&file(&f.path(source).join("state.json"))).unwrap();
        assert_eq!(state["data"]["source"], source);
        let text = match corpus {
            None => rosetta_moe::data::SHAKESPEARE,
            Some(_) => rosetta_moe::data::SOURCE_CORPUS,
        };
        // The run's text is that corpus: its FNV-1a hash is the fingerprint.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        assert_eq!(
            state["data"]["fingerprint"],
            format!("{hash:016x}"),
            "{source}"
        );
        // A resume needs no --data: the run's own corpus is taken again.
        let resumed = moe(&["train", "--resume", &out, "--steps", "3"]);
        assert!(resumed.status.success(), "{}", stderr(&resumed));
    }
    // The other corpus with --resume is another text; a name that is not a
    // corpus and --corpus beside --data are usage errors.
    let other = moe(&[
        "train",
        "--resume",
        &f.s("built-in:source"),
        "--corpus",
        "shakespeare",
        "--steps",
        "4",
    ]);
    assert_eq!(other.status.code(), Some(1), "{}", stderr(&other));
    assert!(
        stderr(&other).contains("another text"),
        "{}",
        stderr(&other)
    );
    let data = f.s("text.txt");
    for bad in [
        &["train", "--corpus", "nosuch"][..],
        &["train", "--corpus", "source", "--data", &data],
    ] {
        assert_eq!(moe(bad).status.code(), Some(2), "{bad:?}");
    }
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
    let mut child = Command::new(MOE)
        .args([
            "train", "--data", &data, "--config", &config, "--out", &out, "--steps", "1000000",
            "--batch", "2", "--seq", "16",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = f.path("run/metrics.jsonl");
    // No time limit (a loaded machine may take any time), but a trainer that
    // stops on its own fails the test at once.
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 20 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("training stopped before 20 steps: {status}");
        }
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
fn generate_refuses_bad_requests_before_printing_anything() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "2"]).status.success());
    let run = f.s("run");
    for (args, expect) in [
        (vec!["--prompt", ""], "empty"),
        (vec!["--prompt", "hi", "--stop", ""], "--stop"),
        (
            vec!["--prompt", "hi", "--max-new", "18446744073709551615"],
            "--max-new",
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
        (
            vec!["--prompt", "hi", "--json", "/nonexistent/dir/out.json"],
            "directory does not exist",
        ),
    ] {
        let mut full = vec!["generate", "--checkpoint", &run];
        full.extend(args.iter().copied());
        let out = moe(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?} printed before failing");
    }
    let init = f.s("init");
    assert!(moe(&["init", "--out", &init]).status.success());
    let out = moe(&["generate", "--checkpoint", &init, "--prompt", "hi"]);
    assert!(stderr(&out).contains("tokenizer.json"), "{}", stderr(&out));
}

/// `moe generate --json` on the fixture's run, greedy, with `extra` flags.
fn generate_json(run: &str, prompt: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate",
        "--checkpoint",
        run,
        "--prompt",
        prompt,
        "--strategy",
        "greedy",
        "--json",
    ];
    args.extend(extra);
    let out = moe(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_stops_at_a_stop_string_without_printing_it() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "30"]).status.success());
    let run = f.s("run");
    let full = generate_json(&run, "line 1", &["--max-new", "30"]);
    assert_eq!(full["stop"], "max_new");
    let completion = full["completion"].as_str().unwrap().to_string();
    // A stop string from the middle of the unstopped completion (two ASCII
    // letters or digits: a replacement character would not match the bytes).
    let chars: Vec<char> = completion.chars().collect();
    let i = (3..chars.len() - 1)
        .find(|&i| chars[i..i + 2].iter().all(char::is_ascii_alphanumeric))
        .expect("the completion has two ASCII letters in a row");
    let stop: String = chars[i..i + 2].iter().collect();
    let at = completion.find(&stop).unwrap();
    let stopped = generate_json(&run, "line 1", &["--max-new", "30", "--stop", &stop]);
    assert_eq!(stopped["stop"], "stop_string");
    assert_eq!(stopped["stop_string"], stop.as_str());
    assert_eq!(stopped["completion"], &completion[..at]);
    assert!(stopped["new_tokens"].as_u64().unwrap() < 30);
    // Streamed: the same text, the stop string never printed.
    let out = moe(&[
        "generate",
        "--checkpoint",
        &run,
        "--prompt",
        "line 1",
        "--strategy",
        "greedy",
        "--max-new",
        "30",
        "--stop",
        "never seen",
        "--stop",
        &stop,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("line 1{}\n", &completion[..at])
    );
}

#[test]
fn generate_runs_past_max_seq_len_with_a_sliding_window() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "2"]).status.success());
    let run = f.s("run");
    // The fixture's max_seq_len is 64.
    let long = generate_json(&run, "the quick", &["--max-new", "100"]);
    assert_eq!(long["new_tokens"], 100);
    assert_eq!(long["stop"], "max_new");
    let long_prompt = "word ".repeat(200);
    let mut args = vec!["generate", "--checkpoint", &run, "--prompt", &long_prompt];
    args.extend(["--max-new", "5", "--json"]);
    let out = moe(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("sees its last 64"),
        "{}",
        stderr(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["context_tokens"], 64);
    assert_eq!(report["new_tokens"], 5);
    let none = moe(&[
        "generate",
        "--checkpoint",
        &run,
        "--prompt",
        "the quick",
        "--max-new",
        "0",
    ]);
    assert!(none.status.success(), "{}", stderr(&none));
    assert_eq!(String::from_utf8_lossy(&none.stdout), "the quick\n");
}

/// Waits until `path` exists (a run's first checkpoint) while `child`, which
/// writes it, runs. No time limit (a loaded machine may take any time): it
/// fails when the child has exited without writing it.
fn wait_for(path: &Path, child: &mut std::process::Child) {
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                path.exists(),
                "{} never appeared: moe train exited with {status}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `moe train` on the fixture as a child process (saving every step).
fn spawn_train(f: &Fixture, resume: bool, steps: &str) -> std::process::Child {
    spawn_train_into(f, "run", resume, steps)
}

/// [`spawn_train`] into (or resuming from) the run directory `dir`.
fn spawn_train_into(f: &Fixture, dir: &str, resume: bool, steps: &str) -> std::process::Child {
    let (data, config, run) = (f.s("text.txt"), f.s("config.json"), f.s(dir));
    let mut args = vec![
        "train",
        "--data",
        &data,
        "--steps",
        steps,
        "--save-every",
        "1",
    ];
    if resume {
        args.extend(["--resume", &run]);
    } else {
        args.extend([
            "--config", &config, "--out", &run, "--batch", "2", "--seq", "16",
        ]);
    }
    Command::new(MOE)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The step a run directory resumes from (it must load).
fn saved_step(dir: &Path) -> u64 {
    match rosetta_moe::checkpoint::load_training(dir) {
        Ok((_, state)) => state.step,
        Err(e) => panic!("the run does not resume: {e}"),
    }
}

/// Kills `moe train --save-every 1` with SIGKILL at `kills` random moments:
/// after each kill the directory loads (never further back than before), and
/// training on to the end reproduces an uninterrupted run bit for bit.
fn killed_runs_resume_bit_identically(kills: usize) {
    const STEPS: &str = "60";
    let f = Fixture::new();
    let mut straight = spawn_train_into(&f, "straight", false, STEPS);
    wait_for(&f.path("straight/state.json"), &mut straight);
    let stepping = std::time::Instant::now();
    assert!(straight.wait().unwrap().success());
    // Kill moments are spread over the time the steps after the first save
    // take on this machine (a fixed window, or one that counts the start-up,
    // would let a fast machine finish before every kill). That time is a
    // first guess only: on a shared machine the uninterrupted run may have
    // been slowed by a load that is gone by the time of the kills. Every run
    // that finishes before its kill proves the window too long, so it is
    // halved; the kills then land within the run however its speed changes.
    let mut span = (stepping.elapsed().as_micros() as u64).max(1);
    let total: u64 = STEPS.parse().unwrap();
    let mut left = total;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill moments seeded with {seed}");
    let mut rng = seed | 1;
    let (mut killed, mut restarts, mut finished_in_a_row) = (0, 0, 0);
    let mut child = spawn_train(&f, false, STEPS);
    wait_for(&f.path("run/state.json"), &mut child);
    loop {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_micros(
            (rng >> 33) % (span * left / total).max(1),
        ));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap();
            killed += 1;
        }
        let status = child.wait().unwrap();
        assert!(!finished || status.success(), "{status}");
        if finished {
            span = (span / 2).max(1);
            finished_in_a_row += 1;
            // Halved this often, the window is a microsecond: the kill
            // follows the first save at once, so only a run that trains
            // without taking time can still finish first.
            assert!(
                finished_in_a_row <= 40,
                "the run keeps finishing before it is killed"
            );
        } else {
            finished_in_a_row = 0;
        }
        let step = saved_step(&f.path("run"));
        left = total - step.min(total);
        // Killed after the last save: the run is complete (resuming would be
        // refused as already at --steps).
        let complete = finished || step == 60;
        if complete || killed >= kills {
            if !complete {
                child = spawn_train(&f, true, STEPS);
                assert!(child.wait().unwrap().success());
            }
            // A kill after the last commit point may leave its files in the
            // commit directory; the next writer (as here) moves them into place.
            rosetta_moe::checkpoint::recover(&f.path("run")).unwrap();
            for name in ["model.safetensors", "optimizer.safetensors", "state.json"] {
                assert!(
                    file(&f.path("straight").join(name)) == file(&f.path("run").join(name)),
                    "{name} differs from the uninterrupted run after {killed} kills"
                );
            }
            let losses = |dir: &str| -> Vec<(u64, f64)> {
                String::from_utf8(file(&f.path(dir).join("metrics.jsonl")))
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                    .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
                    .collect()
            };
            assert_eq!(losses("straight"), losses("run"));
            if killed >= kills {
                eprintln!("{killed} kills, {restarts} restarts, last window {span} µs");
                break;
            }
            // Finished before enough kills: start over.
            std::fs::remove_dir_all(f.path("run")).unwrap();
            (restarts, left) = (restarts + 1, total);
            child = spawn_train(&f, false, STEPS);
            wait_for(&f.path("run/state.json"), &mut child);
            continue;
        }
        assert!(step <= 60);
        child = spawn_train(&f, true, STEPS);
    }
    assert!(!f.path("run/.checkpoint-new").exists() && !f.path("run/.checkpoint-commit").exists());
}

#[test]
fn sigkill_during_saves_never_loses_the_run_20_times() {
    killed_runs_resume_bit_identically(20);
}

/// The heavy variant: `cargo test --release --test cli -- --ignored`.
#[test]
#[ignore = "heavy: 200 kills, a few minutes"]
fn sigkill_during_saves_never_loses_the_run_200_times() {
    killed_runs_resume_bit_identically(200);
}

/// The checkpoint files of two run directories are the same bytes.
fn assert_same_run(f: &Fixture, a: &str, b: &str, context: &str) {
    for name in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(
            file(&f.path(a).join(name)) == file(&f.path(b).join(name)),
            "{name} differs from the uninterrupted run ({context})"
        );
    }
}

/// `moe train --resume` on the fixture's `run`: its exit code and stderr.
fn resume_run(f: &Fixture, steps: &str) -> (Option<i32>, String) {
    let (data, run) = (f.s("text.txt"), f.s("run"));
    let out = moe(&["train", "--data", &data, "--resume", &run, "--steps", steps]);
    (out.status.code(), stderr(&out))
}

/// What a SIGKILL during a start-up may leave in `run`: nothing, the remains
/// of a start-up (a lock, a tokenizer, an empty metrics log, temporaries, an
/// uncommitted save) or a checkpoint. Each must lead on, without --force, to
/// the run an uninterrupted start makes: the first two by the same command
/// (`--resume` says why it cannot), the last by `--resume`, with that same
/// command refused so the checkpoint is never overwritten.
fn carry_on_after_kill(f: &Fixture, steps: &str) -> &'static str {
    let run = f.path("run");
    let outcome = if !run.exists() {
        "no directory"
    } else if let Ok((saved, state)) = rosetta_moe::checkpoint::load_training(&run) {
        // Read as a reader does: a kill after the commit point may have left
        // the set in the commit directory.
        let before = saved.model().params().to_vec();
        let again = f.train("run", &["--steps", steps, "--save-every", "1"]);
        assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
        assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
        let (after, _) = rosetta_moe::checkpoint::load_training(&run).unwrap();
        assert_eq!(after.model().params(), &before[..], "overwritten");
        if state.step < steps.parse().unwrap() {
            let (code, err) = resume_run(f, steps);
            assert_eq!(code, Some(0), "{err}");
        }
        "a checkpoint"
    } else {
        let (code, err) = resume_run(f, steps);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("holds no checkpoint yet"), "{err}");
        assert!(err.contains("no --force needed"), "{err}");
        "start-up remains"
    };
    if outcome != "a checkpoint" {
        let out = f.train("run", &["--steps", steps, "--save-every", "1"]);
        assert!(out.status.success(), "{outcome}: {}", stderr(&out));
    }
    // A kill after the last commit point may leave its files in the commit
    // directory; the next writer (as here) moves them into place.
    rosetta_moe::checkpoint::recover(&run).unwrap();
    assert_same_run(f, "straight", "run", outcome);
    for junk in [".checkpoint-new", ".checkpoint-commit"] {
        assert!(!run.join(junk).exists(), "{junk} left after {outcome}");
    }
    outcome
}

#[test]
fn the_remains_of_a_start_up_restart_without_force_and_resume_says_so() {
    const STEPS: &str = "3";
    let f = Fixture::new();
    let straight = f.train("straight", &["--steps", STEPS, "--save-every", "1"]);
    assert!(straight.status.success(), "{}", stderr(&straight));
    let tokenizer = file(&f.path("straight/tokenizer.json"));
    let run = f.path("run");
    // Every state a start-up passes through before its step-0 checkpoint
    // commits, in order (each later one adds files).
    let states: [&[(&str, &[u8])]; 5] = [
        &[],
        &[(".lock", b"")],
        &[(".lock", b""), ("tokenizer.json", &tokenizer)],
        &[
            (".lock", b""),
            ("tokenizer.json", &tokenizer),
            ("metrics.jsonl", b""),
        ],
        &[
            (".lock", b""),
            (".tmpAb12Cd", b"half a tok"),
            ("tokenizer.json", &tokenizer),
            ("metrics.jsonl", b""),
            (".checkpoint-new/model.safetensors", b"half a file"),
        ],
    ];
    for state in states {
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(run.join(".checkpoint-new")).unwrap();
        if !state
            .iter()
            .any(|(name, _)| name.starts_with(".checkpoint-new"))
        {
            std::fs::remove_dir(run.join(".checkpoint-new")).unwrap();
        }
        for (name, bytes) in state {
            std::fs::write(run.join(name), bytes).unwrap();
        }
        let names: Vec<_> = state.iter().map(|(name, _)| name).collect();
        assert_eq!(
            carry_on_after_kill(&f, STEPS),
            "start-up remains",
            "{names:?}"
        );
    }
    // Not what a start-up leaves: refused without --force, untouched.
    for (name, bytes) in [
        ("metrics.jsonl", &b"{\"step\": 1}\n"[..]),
        ("notes.txt", b"mine"),
        ("config.json", b"{}"),
    ] {
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join(".lock"), b"").unwrap();
        std::fs::write(run.join("tokenizer.json"), &tokenizer).unwrap();
        std::fs::write(run.join(name), bytes).unwrap();
        let out = f.train("run", &["--steps", STEPS]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains("--force"), "{name}: {}", stderr(&out));
        assert_eq!(file(&run.join(name)), bytes, "{name} was touched");
    }
}

/// Kills `moe train` with SIGKILL at moments spread evenly over its start-up
/// (launch to its step-0 checkpoint, and a little beyond), each moment
/// jittered at random: whatever the kill leaves, the run carries on to the
/// bits of an uninterrupted one without --force and without losing a save.
#[test]
fn sigkill_at_every_moment_of_start_up_never_strands_the_directory() {
    const STEPS: &str = "3";
    const KILLS: u64 = 30;
    let f = Fixture::new();
    let launched = Instant::now();
    let mut straight = spawn_train_into(&f, "straight", false, STEPS);
    wait_for(&f.path("straight/state.json"), &mut straight);
    let span = (launched.elapsed().as_micros() as u64).max(KILLS);
    assert!(straight.wait().unwrap().success());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill moments seeded with {seed}, start-up {span} µs");
    let mut rng = seed | 1;
    let mut seen = std::collections::BTreeMap::new();
    // Slot k of KILLS + KILLS/5 covers [k, k + 1)·span/KILLS.
    let slot = span / KILLS;
    for k in 0..KILLS + KILLS / 5 {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let _ = std::fs::remove_dir_all(f.path("run"));
        let mut child = spawn_train(&f, false, STEPS);
        std::thread::sleep(Duration::from_micros(k * slot + (rng >> 33) % slot));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap();
        }
        let status = child.wait().unwrap();
        assert!(!finished || status.success(), "{status}");
        *seen.entry(carry_on_after_kill(&f, STEPS)).or_insert(0) += 1;
    }
    eprintln!("after the kills: {seen:?}");
}

#[test]
fn a_second_trainer_on_the_same_directory_fails_at_once() {
    let f = Fixture::new();
    let mut first = spawn_train(&f, false, "1000000");
    wait_for(&f.path("run/state.json"), &mut first);
    let (data, config, run) = (f.s("text.txt"), f.s("config.json"), f.s("run"));
    for args in [
        vec!["train", "--data", &data, "--resume", &run],
        vec![
            "train", "--data", &data, "--config", &config, "--out", &run, "--force",
        ],
    ] {
        let out = moe(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("in use by another `moe train`"),
            "{}",
            stderr(&out)
        );
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // The kernel released the lock with the process.
    let next = (saved_step(&f.path("run")) + 1).to_string();
    let out = moe(&["train", "--data", &data, "--resume", &run, "--steps", &next]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_save_that_runs_out_of_space_reports_it_and_keeps_the_previous_checkpoint() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "3"]).status.success());
    let before = file(&f.path("run/model.safetensors"));
    // No file may grow past 200 blocks (100 KB in dash's 512-byte blocks,
    // 200 KB in bash's): the optimizer file (380 KB) cannot be written, as on
    // a full disk. SIGXFSZ is ignored so the write fails with EFBIG instead of
    // killing the process.
    let (data, run) = (f.s("text.txt"), f.s("run"));
    let script = format!(
        "trap '' XFSZ; ulimit -f 200; exec {MOE} train --data {data} --resume {run} --steps 5"
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("too large"), "{}", stderr(&out));
    assert_eq!(file(&f.path("run/model.safetensors")), before);
    assert_eq!(saved_step(&f.path("run")), 3);
    assert!(!f.path("run/.checkpoint-new").exists());
    let out = moe(&["train", "--data", &data, "--resume", &run, "--steps", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(saved_step(&f.path("run")), 5);
}

#[test]
fn no_input_makes_moe_panic_or_abort() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "2"]).status.success());
    let (data, run) = (f.s("text.txt"), f.s("run"));
    let big = f.s("big.json");
    std::fs::write(
        &big,
        ModelConfig {
            max_seq_len: 1_000_000_000_000,
            ..ModelConfig::tiny()
        }
        .to_json(),
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["train", "--save-every", "0"], 2, "--save-every"),
        (vec!["train", "--eval-every", "0"], 2, "--eval-every"),
        (
            vec![
                "train",
                "--data",
                &data,
                "--batch",
                "9223372036854775807",
                "--out",
                "/nonexistent/x",
            ],
            1,
            "needs",
        ),
        (
            vec![
                "train",
                "--data",
                &data,
                "--batch",
                "1000000",
                "--seq",
                "64",
                "--out",
                "/nonexistent/x",
            ],
            1,
            "needs",
        ),
        (
            vec!["init", "--config", &big, "--out", "/nonexistent/x"],
            1,
            "needs",
        ),
        (
            vec![
                "init",
                "--config",
                "default_6_9b",
                "--out",
                "/nonexistent/x",
            ],
            1,
            "",
        ),
    ];
    for (args, code, expect) in cases {
        let out = moe(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    // A state.json whose window length is 0.
    let state_path = f.path("run/state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&file(&state_path)).unwrap();
    state["data"]["seq_len"] = 0.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let out = moe(&["train", "--data", &data, "--resume", &run, "--steps", "4"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("seq_len 0"), "{}", stderr(&out));
}

#[test]
fn a_diverging_run_stops_with_the_rule_and_keeps_the_last_good_checkpoint() {
    let f = Fixture::new();
    let wild = [
        "--lr",
        "10",
        "--grad-clip",
        "0",
        "--warmup",
        "1",
        "--steps",
        "20",
    ];
    // Saving every step: step 1's update blows the model up, which the check
    // before its save catches, so the step-0 checkpoint stays.
    let out = f.train("every", &[&wild[..], &["--save-every", "1"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("training diverged at step 1: cross-entropy"),
        "{text}"
    );
    assert!(text.contains("4·ln V"), "{text}");
    let state: serde_json::Value =
        serde_json::from_slice(&file(&f.path("every/state.json"))).unwrap();
    assert_eq!(state["step"], 0);
    let config = ModelConfig::load(&f.path("config.json")).unwrap();
    let fresh = rosetta_moe::Model::new(config, 42).unwrap();
    let saved = rosetta_moe::checkpoint::load_model(&f.path("every")).unwrap();
    assert_eq!(saved.params(), fresh.params());
    // Saving rarely: step 2's own loss breaks the rule and it is refused.
    let out = f.train("rare", &wild);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("training diverged at step 2"),
        "{}",
        stderr(&out)
    );
    let state: serde_json::Value =
        serde_json::from_slice(&file(&f.path("rare/state.json"))).unwrap();
    assert_eq!(state["step"], 0);
}

#[test]
fn min_lr_ratio_sets_the_schedule_floor_and_is_checked_first() {
    let f = Fixture::new();
    let flags = ["--steps", "3", "--warmup", "1", "--lr", "1e-3"];
    let out = f.train("run", &[&flags[..], &["--min-lr-ratio", "0.25"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics = String::from_utf8(file(&f.path("run/metrics.jsonl"))).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    // Step 3 ends the 3-step schedule: lr = 0.25·1e-3.
    assert!(
        (last["lr"].as_f64().unwrap() - 2.5e-4).abs() < 1e-12,
        "{last}"
    );
    let out = f.train("bad", &[&flags[..], &["--min-lr-ratio", "1.5"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("min_lr_ratio = 1.5 must be in [0, 1]"),
        "{}",
        stderr(&out)
    );
    assert!(
        !f.path("bad").exists(),
        "refused before the directory is made"
    );
}

#[test]
fn generate_refuses_the_logits_of_a_diverged_checkpoint() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "2"]).status.success());
    let dir = f.path("run");
    let mut model = rosetta_moe::checkpoint::load_model(&dir).unwrap();
    let head = model.layout().lm_head.clone();
    model.params_mut()[head].iter_mut().for_each(|w| *w = 3e38);
    rosetta_moe::checkpoint::save_model(&model, &dir).unwrap();
    let run = f.s("run");
    let out = moe(&[
        "generate",
        "--checkpoint",
        &run,
        "--prompt",
        "the",
        "--max-new",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "the prompt was printed before failing"
    );
    assert!(
        stderr(&out).contains("non-finite logits"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_command_refuses_bad_options_before_any_output() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "2"]).status.success());
    let (data, run, config) = (f.s("text.txt"), f.s("run"), f.s("config.json"));
    let (fresh, no_dir) = (f.s("fresh"), "/nonexistent/dir/out.json");
    let metrics = file(&f.path("run/metrics.jsonl"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "train", "--data", &data, "--config", &config, "--steps", "0", "--out", &fresh,
            ],
            "already at step 0",
        ),
        (
            vec![
                "train", "--data", &data, "--config", &config, "--lr=-1", "--out", &fresh,
            ],
            "lr = -1",
        ),
        (
            vec![
                "train", "--data", &data, "--config", &config, "--beta1", "2", "--out", &fresh,
            ],
            "beta1 = 2",
        ),
        (
            vec![
                "train", "--data", &data, "--config", &config, "--seq", "65", "--out", &fresh,
            ],
            "exceeds max_seq_len",
        ),
        (
            vec![
                "train", "--data", &data, "--config", &config, "--json", no_dir, "--out", &fresh,
            ],
            "directory does not exist",
        ),
        (
            vec!["train", "--data", &data, "--resume", &run, "--steps", "1"],
            "already at step 2",
        ),
        (
            vec![
                "eval",
                "--checkpoint",
                &run,
                "--data",
                &data,
                "--stride",
                "0",
            ],
            "stride",
        ),
        (
            vec!["eval", "--checkpoint", &run, "--data", &fresh],
            "No such file",
        ),
        (
            vec!["export", "--checkpoint", &fresh, "--out", &fresh],
            "not a directory",
        ),
        (
            vec!["export", "--checkpoint", &run, "--out", &run],
            "not empty",
        ),
        (
            vec!["init", "--config", "nosuch", "--out", &fresh],
            "unknown preset",
        ),
        (
            vec!["init", "--json", no_dir, "--out", &fresh],
            "directory does not exist",
        ),
        (
            vec!["bench", "--scenario", "nosuch"],
            "no benchmark scenario",
        ),
        (vec!["bench", "--json", no_dir], "directory does not exist"),
        (
            vec!["stability", "--markdown", no_dir],
            "directory does not exist",
        ),
        (
            vec!["convergence", "--json", no_dir],
            "directory does not exist",
        ),
    ];
    for (args, expect) in cases {
        let out = moe(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("error: "),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?} printed before failing");
        assert!(!f.path("fresh").exists(), "{args:?} wrote its output");
    }
    assert_eq!(
        file(&f.path("run/metrics.jsonl")),
        metrics,
        "resume touched the run"
    );
}

#[test]
fn json_alone_goes_to_stdout_and_json_file_to_the_file() {
    let f = Fixture::new();
    let (a, b, report) = (f.s("a"), f.s("b"), f.s("report.json"));
    let out = moe(&[
        "init",
        "--config",
        &f.s("config.json"),
        "--out",
        &a,
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["seed"], 42);
    assert!(
        stderr(&out).contains("wrote"),
        "the human text goes to stderr"
    );
    let out = moe(&[
        "init",
        "--config",
        &f.s("config.json"),
        "--out",
        &b,
        "--json",
        &report,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote"));
    let written: serde_json::Value = serde_json::from_slice(&file(&f.path("report.json"))).unwrap();
    assert_eq!(written["params"], summary["params"]);
    let out = moe(&["convergence", "--steps", "2", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let losses: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(losses["steps"], 2);
}

/// A run's `state.json`.
fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&file(&dir.join("state.json"))).unwrap()
}

#[test]
fn the_main_job_takes_the_default_recipe_and_every_flag_wins_over_a_recipe() {
    let f = Fixture::new();
    let recipe: serde_json::Value =
        serde_json::from_str(include_str!("../configs/shakespeare-90s.json")).unwrap();
    // No text, config or model given: the main job, on the default recipe.
    let main = f.s("main");
    let out = moe(&["train", "--out", &main, "--steps", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("recipe shakespeare-90s"),
        "{}",
        stderr(&out)
    );
    let config: serde_json::Value =
        serde_json::from_slice(&file(&f.path("main/config.json"))).unwrap();
    assert_eq!(config, recipe["model"]);
    let s = state(&f.path("main"));
    assert_eq!(s["data"]["batch_size"], recipe["batch"]);
    assert_eq!(s["data"]["seq_len"], recipe["seq"]);
    assert_eq!(s["train"]["lr"], recipe["lr"]);
    // Flags win; --config, --data or --init-from leave the recipe out.
    let flagged = f.s("flagged");
    let out = moe(&[
        "train", "--out", &flagged, "--steps", "2", "--batch", "3", "--lr", "0.02", "--hidden",
        "32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = state(&f.path("flagged"));
    assert_eq!(
        (s["data"]["batch_size"].as_u64(), s["train"]["lr"].as_f64()),
        (Some(3), Some(0.02))
    );
    assert_eq!(s["data"]["seq_len"], recipe["seq"]);
    let out = f.train("plain", &["--steps", "2"]);
    assert!(!stderr(&out).contains("recipe"), "{}", stderr(&out));
    assert_eq!(state(&f.path("plain"))["train"]["lr"], 1e-3);
    // A recipe file of one's own; unknown keys and steps beside time are errors.
    let model: serde_json::Value = serde_json::from_slice(&file(&f.path("config.json"))).unwrap();
    let mine = serde_json::json!({"about": "test", "model": model, "steps": 3, "batch": 2, "seq": 16, "lr": 0.005, "weight_decay": 0.3, "dropout": 0.1});
    std::fs::write(f.path("recipe.json"), mine.to_string()).unwrap();
    let (data, recipe_file, own) = (f.s("text.txt"), f.s("recipe.json"), f.s("own"));
    let out = moe(&[
        "train",
        "--data",
        &data,
        "--recipe",
        &recipe_file,
        "--out",
        &own,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = state(&f.path("own"));
    assert_eq!(s["step"], 3);
    assert_eq!(
        (
            s["train"]["lr"].as_f64(),
            s["train"]["weight_decay"].as_f64(),
            s["train"]["dropout"].as_f64()
        ),
        (Some(0.005), Some(0.3), Some(0.1))
    );
    for (key, value, says) in [
        ("label_smoothing", serde_json::json!(0.1), "unknown field"),
        ("time", serde_json::json!("1m"), "not both"),
    ] {
        let mut bad = mine.clone();
        bad[key] = value;
        std::fs::write(f.path("bad.json"), bad.to_string()).unwrap();
        let out = moe(&[
            "train",
            "--data",
            &data,
            "--recipe",
            &f.s("bad.json"),
            "--out",
            &f.s("bad"),
        ]);
        assert_eq!(out.status.code(), Some(1), "{key}");
        assert!(stderr(&out).contains(says), "{key}: {}", stderr(&out));
        assert!(!f.path("bad").exists(), "{key}: nothing written");
    }
}

#[test]
fn eval_scores_the_split_training_made_of_a_file_or_corpus() {
    let f = Fixture::new();
    assert!(f.train("run", &["--steps", "2"]).status.success());
    let (run, data) = (f.s("run"), f.s("text.txt"));
    let tokens = |split: &str| {
        report(&[
            "eval",
            "--checkpoint",
            &run,
            "--data",
            &data,
            "--split",
            split,
            "--json",
        ])["tokens"]
            .as_u64()
            .unwrap()
    };
    let (all, train, val) = (tokens("all"), tokens("train"), tokens("val"));
    // Each window scores its tokens but the first: one per split, one for all.
    assert_eq!(train + val, all - 1);
    assert_eq!(val + 1, (all + 1) - ((all + 1) as f64 * 0.9) as u64);
    let corpus = report(&[
        "eval",
        "--checkpoint",
        &run,
        "--corpus",
        "shakespeare",
        "--split",
        "val",
        "--json",
    ]);
    assert_eq!(corpus["data"], "built-in:shakespeare");
    assert_eq!(corpus["split"], "val");
    let neither = moe(&["eval", "--checkpoint", &run]);
    assert_eq!(neither.status.code(), Some(2));
    // Windows are the run's training length (16 here) unless --seq says otherwise.
    let window = |extra: &[&str]| {
        let args = [
            &["eval", "--checkpoint", &run, "--data", &data, "--json"],
            extra,
        ]
        .concat();
        (
            report(&args)["seq"].clone(),
            report(&args)["stride"].clone(),
        )
    };
    assert_eq!(window(&[]), (16.into(), 16.into()));
    assert_eq!(window(&["--seq", "8"]), (8.into(), 8.into()));
    // A model saved without its training state falls back to max_seq_len (≤ 256).
    let config: serde_json::Value = serde_json::from_slice(&file(&f.path("config.json"))).unwrap();
    std::fs::remove_file(f.path("run").join("state.json")).unwrap();
    let max = config["max_seq_len"].as_u64().unwrap().min(256);
    assert_eq!(window(&[]), (max.into(), max.into()));
}
