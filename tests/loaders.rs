//! Every loader refuses hostile files with a typed error, before allocating
//! (issue 22): oversize configs of either format on every path that builds a
//! model, files that are not JSON (named with line and column), and the
//! inputs the coverage-guided fuzz targets of `fuzz/` found.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rosetta_moe::checkpoint::{self, load_model, load_training, save_training};
use rosetta_moe::data::{DataState, RngState};
use rosetta_moe::{Batch, Model, ModelConfig, MoeError, Tokenizer, TrainConfig, Trainer, hf};

const MOE: &str = env!("CARGO_BIN_EXE_moe");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of the files of `from` in a fresh directory.
fn copy_dir(from: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Sets `field` of the JSON file at `path` to `value`.
fn edit_json(path: &Path, field: &str, value: serde_json::Value) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json[field] = value;
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// The four hostile Hugging Face fields of issue 22, and ours for the same sizes.
const HOSTILE_HF: [(&str, u64); 4] = [
    ("num_hidden_layers", 1_000_000_000),
    ("vocab_size", 4_000_000_000),
    ("num_local_experts", 1 << 31),
    ("intermediate_size", 1_000_000_000_000),
];
const HOSTILE_OURS: [(&str, u64); 4] = [
    ("n_layers", 1_000_000_000),
    ("vocab_size", 4_000_000_000),
    ("n_experts", 1 << 31),
    ("ffn_dim", 1_000_000_000_000),
];

/// An out-of-memory error whose need is beyond any machine (over 1 TB).
fn assert_refused_for_memory<T: std::fmt::Debug>(result: rosetta_moe::Result<T>, what: &str) {
    match result {
        Err(e @ MoeError::OutOfMemory { need, .. }) => {
            assert!(need > 1_000_000_000_000, "{what}: {need}");
            let message = e.to_string();
            assert!(
                message.contains("needs") && message.contains("GB available"),
                "{what}: {message}"
            );
        }
        other => panic!("{what}: {other:?}"),
    }
}

fn moe(args: &[&str]) -> Output {
    Command::new(MOE).args(args).output().expect("moe runs")
}

/// Exit code 1 and the memory error on stderr.
fn assert_exit_1_out_of_memory(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(
        stderr.contains("needs") && stderr.contains("GB available"),
        "{what}: {stderr}"
    );
}

#[test]
fn hostile_hugging_face_sizes_are_refused_by_the_library_before_allocating() {
    for (field, value) in HOSTILE_HF {
        let dir = copy_dir(&fixture("hf_tiny"));
        edit_json(&dir.path().join("config.json"), field, value.into());
        assert_refused_for_memory(hf::load_model(dir.path()), field);
        assert_refused_for_memory(hf::import(dir.path()), field);
    }
}

#[test]
fn hostile_hugging_face_sizes_exit_1_on_every_command_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let batch = work.path().join("b.json");
    std::fs::write(&batch, r#"{"ids": [[1, 2, 3]], "targets": [[2, 3, 4]]}"#).unwrap();
    let text = work.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    for (field, value) in HOSTILE_HF {
        let dir = copy_dir(&fixture("hf_tiny"));
        edit_json(&dir.path().join("config.json"), field, value.into());
        let ck = dir.path().to_str().unwrap();
        let out = work.path().join(format!("dump-{field}.safetensors"));
        let run = work.path().join(format!("run-{field}"));
        let (out_s, run_s) = (out.to_str().unwrap(), run.to_str().unwrap());
        let (batch, text) = (batch.to_str().unwrap(), text.to_str().unwrap());
        let commands: [&[&str]; 4] = [
            &["dump", "--checkpoint", ck, "--batch", batch, "--out", out_s],
            &["train", "--init-from", ck, "--steps", "1", "--out", run_s],
            &["eval", "--checkpoint", ck, "--data", text],
            &["generate", "--checkpoint", ck, "--prompt", "the"],
        ];
        for args in commands {
            assert_exit_1_out_of_memory(&moe(args), &format!("{field}: moe {}", args[0]));
        }
        assert!(!out.exists() && !run.exists(), "{field}: something written");
    }
}

/// Our own tiny checkpoint, as a model or as a training run.
fn our_checkpoint(training: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(ModelConfig::tiny(), 1).unwrap();
    if training {
        let trainer = Trainer::new(model, TrainConfig::default()).unwrap();
        save_training(&trainer, Some(&data_state(2, 8)), dir.path()).unwrap();
    } else {
        checkpoint::save_model(&model, dir.path()).unwrap();
    }
    dir
}

fn data_state(batch_size: usize, seq_len: usize) -> DataState {
    DataState {
        source: "built-in".into(),
        fingerprint: "0".into(),
        batch_size,
        seq_len,
        rng: RngState {
            seed: 1,
            stream: 0,
            word_pos: 0,
        },
        clock: None,
    }
}

#[test]
fn hostile_sizes_in_our_format_are_refused_on_every_path() {
    for (field, value) in HOSTILE_OURS {
        let dir = our_checkpoint(true);
        let config = dir.path().join("config.json");
        edit_json(&config, field, value.into());
        assert_refused_for_memory(load_model(dir.path()), field);
        assert_refused_for_memory(load_training(dir.path()), field);
        assert_refused_for_memory(hf::load_model(dir.path()), field);
        // `moe init --config` and `ModelConfig::load` go through Model::new.
        let parsed = ModelConfig::load(&config).unwrap();
        assert_refused_for_memory(Model::new(parsed, 1), field);
        let out = dir.path().join("init");
        let (config_s, out_s) = (config.to_str().unwrap(), out.to_str().unwrap());
        let init = moe(&["init", "--config", config_s, "--out", out_s]);
        assert_exit_1_out_of_memory(&init, &format!("{field}: moe init"));
        assert!(!out.exists(), "{field}: moe init wrote");
    }
}

#[test]
fn hostile_shape_flags_of_train_are_refused_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--layers", "1000000000"),
        ("--vocab", "4000000000"),
        ("--experts", "2147483648"),
        ("--ffn", "1000000000000"),
    ] {
        let out = work.path().join(flag.trim_start_matches('-'));
        let run = moe(&[
            "train",
            flag,
            value,
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_exit_1_out_of_memory(&run, flag);
        assert!(!out.exists(), "{flag}: wrote {}", out.display());
    }
}

#[test]
fn a_state_json_whose_batch_cannot_be_held_is_refused() {
    for (batch_size, seq_len) in [(1usize << 40, 2), (usize::MAX / 2, 1)] {
        let dir = our_checkpoint(true);
        let path = dir.path().join("state.json");
        let mut state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        state["data"]["batch_size"] = batch_size.into();
        state["data"]["seq_len"] = seq_len.into();
        std::fs::write(&path, state.to_string()).unwrap();
        match load_training(dir.path()) {
            Err(MoeError::OutOfMemory { what, .. }) => {
                assert!(what.contains("state.json"), "{what}")
            }
            other => panic!("{batch_size} × {seq_len}: {other:?}"),
        }
    }
}

/// A syntax error, its expected line and the text around it.
fn assert_json_syntax<T: std::fmt::Debug>(result: rosetta_moe::Result<T>, line: usize, what: &str) {
    match result {
        Err(
            e @ MoeError::JsonSyntax {
                line: l, column, ..
            },
        ) => {
            assert_eq!(l, line, "{what}: {e}");
            assert!(column > 0, "{what}");
            let message = e.to_string();
            assert!(
                message.contains("not valid JSON") && message.contains(&format!("line {line}")),
                "{what}: {message}"
            );
        }
        other => panic!("{what}: {other:?}"),
    }
}

#[test]
fn a_config_that_is_not_json_is_reported_with_its_line_and_column() {
    // Issue 22's case: a Hugging Face config with `"vocab_size": NaN` on line 2
    // was read by our own format's parser ("unknown field hidden_size").
    let dir = copy_dir(&fixture("hf_tiny"));
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut rest = json.as_object().unwrap().clone();
    rest.remove("vocab_size");
    let body = serde_json::to_string_pretty(&rest).unwrap();
    let broken = format!("{{\n  \"vocab_size\": NaN,{}", &body[1..]);
    std::fs::write(&config, &broken).unwrap();
    assert_json_syntax(hf::load_model(dir.path()), 2, "hf::load_model");
    assert_json_syntax(hf::import(dir.path()), 2, "hf::import");
    let out = Command::new(MOE)
        .args(["generate", "--prompt", "the", "--checkpoint"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not valid JSON") && stderr.contains("line 2, column 17"),
        "{stderr}"
    );
    assert!(!stderr.contains("unknown field"), "{stderr}");

    // Our own format: the syntax error is named even after an unknown key.
    let ours = our_checkpoint(true);
    std::fs::write(
        ours.path().join("config.json"),
        "{\"typo\": 1,\n\"hidden_dim\": 64,\n\"n_layers\": NaN}",
    )
    .unwrap();
    assert_json_syntax(load_model(ours.path()), 3, "our config.json");
    assert_json_syntax(hf::load_model(ours.path()), 3, "our config.json via hf");
    // Valid JSON of the wrong form is still the typed parser's complaint.
    std::fs::write(ours.path().join("config.json"), "{\"typo\": 1}").unwrap();
    match load_model(ours.path()) {
        Err(MoeError::Checkpoint { reason, .. }) => assert!(reason.contains("typo"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_other_json_loader_reports_syntax_errors_with_their_line() {
    let broken = "{\n\n  \"ids\": [[1, 2,]]}";
    assert_json_syntax(Batch::from_json(broken), 3, "batch");
    assert_json_syntax(TrainConfig::from_json(broken), 3, "train config");
    assert_json_syntax(ModelConfig::from_json(broken), 3, "model config");
    let path = Path::new("tokenizer.json");
    assert_json_syntax(
        Tokenizer::from_bytes(broken.as_bytes(), path),
        3,
        "tokenizer",
    );
    let dir = our_checkpoint(true);
    std::fs::write(dir.path().join("state.json"), broken).unwrap();
    assert_json_syntax(load_training(dir.path()), 3, "state.json");
}

#[test]
fn the_memory_check_counts_the_bookkeeping_of_many_tiny_experts() {
    // 10^6 experts of h 2, F 1: 32 MB of weights but 3·10^6 named tensors,
    // whose specs and names take far more than the weights.
    let config = ModelConfig {
        hidden_dim: 2,
        n_layers: 1,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 2,
        n_experts: 1_000_000,
        top_k: 1,
        ffn_dim: 1,
        vocab_size: 4,
        max_seq_len: 4,
        ..ModelConfig::tiny()
    };
    assert!(config.weight_bytes() < 40_000_000);
    assert!(
        config.model_bytes() > 1_500_000_000,
        "{}",
        config.model_bytes()
    );
    // A cap below the bookkeeping, above the weights: refused, not built.
    rosetta_moe::memory::set_limit(Some(1 << 30));
    let refused = Model::new(config, 1);
    // A file larger than the budget is refused before it is read.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("tokenizer.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let read = Tokenizer::load(&big);
    rosetta_moe::memory::set_limit(None);
    match refused {
        Err(MoeError::OutOfMemory { need, .. }) => assert!(need > 1_500_000_000),
        other => panic!("{other:?}"),
    }
    match read {
        Err(MoeError::OutOfMemory { what, need, .. }) => {
            assert!(what.contains("tokenizer.json") && need == 2 << 30, "{what}")
        }
        other => panic!("{other:?}"),
    }
}

/// The model of the fuzz targets' fixtures (fuzz/src/lib.rs `config`).
fn fuzz_config() -> ModelConfig {
    ModelConfig {
        hidden_dim: 8,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        n_experts: 2,
        top_k: 1,
        ffn_dim: 8,
        vocab_size: 32,
        max_seq_len: 8,
        ..ModelConfig::tiny()
    }
}

fn fuzz_finding(name: &str) -> Vec<u8> {
    std::fs::read(fixture("fuzz").join(name)).unwrap()
}

#[test]
fn fuzz_finding_a_tokenizer_giving_one_id_to_two_tokens_is_refused() {
    // The tokenizer target: "Ġquick" renumbered to an id another token has;
    // it loaded, and decode(encode(text)) gave other bytes back.
    let bytes = fuzz_finding("tokenizer-duplicate-id.json");
    match Tokenizer::from_bytes(&bytes, Path::new("tokenizer.json")) {
        Err(MoeError::Checkpoint { reason, .. }) => {
            assert!(reason.contains("given to two tokens"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn fuzz_findings_finite_but_huge_weights_load_and_generation_refuses_their_logits() {
    // The weights targets: finite weights near f32::MAX load (they are valid
    // f32), and overflow the logits; generation must refuse, not sample.
    let ours = checkpoint::model_from_bytes(
        fuzz_config(),
        &fuzz_finding("weights-huge.safetensors"),
        Path::new("model.safetensors"),
    );
    let theirs = hf::model_from_hf_bytes(
        fuzz_config(),
        &fuzz_finding("hf-weights-huge.safetensors"),
        Path::new("model.safetensors"),
    );
    for model in [ours, theirs] {
        let mut model = model.unwrap();
        assert!(model.params().iter().all(|p| p.is_finite()));
        let out = rosetta_moe::sampling::generate(
            &mut model,
            &[0, 1, 2],
            5,
            rosetta_moe::SamplingStrategy::Greedy,
            1,
        );
        assert!(
            matches!(out, Err(MoeError::NonFiniteValue { .. })),
            "{out:?}"
        );
    }
}

#[test]
fn fuzz_finding_a_tokenizer_that_adds_a_prefix_space_is_refused() {
    // The tokenizer target: the pre-tokenizer's "add_prefix_space" turned
    // true (and some BPE keys and merges mangled, which change nothing). It
    // loaded, and encode → decode gave back " the quick…" for "the quick…";
    // the target's round-trip assertion panicked inside libFuzzer's callback
    // ("non-unwinding panic"): not a panic of `tokenizers`.
    let bytes = fuzz_finding("tokenizer-add-prefix-space.json");
    match Tokenizer::from_bytes(&bytes, Path::new("tokenizer.json")) {
        Err(MoeError::Checkpoint { reason, .. }) => {
            assert!(reason.contains("add_prefix_space"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The same setting inside a sequence of pre-tokenizers.
    let good = std::fs::read_to_string(fixture("hf_tiny").join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&good).unwrap();
    let mut byte_level = json["pre_tokenizer"].clone();
    byte_level["add_prefix_space"] = true.into();
    json["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [byte_level]});
    match Tokenizer::from_bytes(json.to_string().as_bytes(), Path::new("tokenizer.json")) {
        Err(MoeError::Checkpoint { reason, .. }) => {
            assert!(reason.contains("add_prefix_space"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tokenizer_that_changes_the_text_is_refused_on_load() {
    // Whatever else makes encode → decode give other bytes (here a
    // normaliser that lower-cases) is caught by the round trip on load.
    let good = std::fs::read_to_string(fixture("hf_tiny").join("tokenizer.json")).unwrap();
    assert!(Tokenizer::from_bytes(good.as_bytes(), Path::new("tokenizer.json")).is_ok());
    let mut json: serde_json::Value = serde_json::from_str(&good).unwrap();
    json["normalizer"] = serde_json::json!({"type": "Lowercase"});
    match Tokenizer::from_bytes(json.to_string().as_bytes(), Path::new("tokenizer.json")) {
        Err(MoeError::Checkpoint { reason, .. }) => {
            assert!(reason.contains("changes the text"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}
