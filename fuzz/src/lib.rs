//! Fixtures shared by the fuzz targets: a model small enough for thousands of
//! loads a second, its files in every format, and the memory cap.

use std::path::Path;
use std::sync::OnceLock;

use rosetta_moe::checkpoint::{save_training, training_from_bytes};
use rosetta_moe::data::{DataState, RngState};
use rosetta_moe::sampling::{self, SamplingStrategy};
use rosetta_moe::{Model, ModelConfig, Tokenizer, TrainConfig, Trainer, hf, memory};

/// What the memory checks may let through in a fuzz target. libFuzzer runs
/// with `-rss_limit_mb=2048`: anything the checks accepted stays far below,
/// so hitting the limit means an allocation no check accounted for.
pub const MEMORY_LIMIT: u64 = 64 << 20;

/// Caps the memory checks at [`MEMORY_LIMIT`] (call first in every target).
pub fn setup() {
    memory::set_limit(Some(MEMORY_LIMIT));
    static SEEDS: std::sync::Once = std::sync::Once::new();
    SEEDS.call_once(|| {
        if let Some(dir) = std::env::var_os("MOE_FUZZ_WRITE_SEEDS") {
            write_seeds(Path::new(&dir));
        }
    });
}

/// The model of the fixtures: h 8, one layer, two experts, V 32, S ≤ 8.
pub fn config() -> ModelConfig {
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

/// The bytes of every fixture file.
pub struct Files {
    /// Our `config.json`.
    pub config: Vec<u8>,
    /// Our `model.safetensors` (step 1).
    pub weights: Vec<u8>,
    /// `optimizer.safetensors` (step 1).
    pub optimizer: Vec<u8>,
    /// `state.json` with a data state.
    pub state: Vec<u8>,
    /// A Hugging Face `config.json`.
    pub hf_config: Vec<u8>,
    /// A Hugging Face `model.safetensors`.
    pub hf_weights: Vec<u8>,
    /// A `tokenizer.json` of 300 tokens.
    pub tokenizer: Vec<u8>,
}

/// The fixture files, made once per process.
pub fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let model = Model::new(config(), 7).expect("fixture model");
        let mut trainer = Trainer::new(model, TrainConfig::default()).expect("trainer");
        let batch = rosetta_moe::Batch::new((0..8).collect(), (1..9).collect(), 2).expect("batch");
        trainer.train_step(&batch).expect("one step");
        let data = DataState {
            source: "built-in".into(),
            fingerprint: "0123456789abcdef".into(),
            batch_size: 2,
            seq_len: 4,
            rng: RngState {
                seed: 1,
                stream: 0,
                word_pos: 8,
            },
            clock: None,
        };
        save_training(&trainer, Some(&data), dir.path()).expect("save");
        let hf_dir = dir.path().join("hf");
        hf::export(trainer.model(), None, 0.01, &hf_dir).expect("export");
        let text = "the quick brown fox jumps over the lazy dog\n".repeat(20);
        let tokenizer = Tokenizer::train(text.as_bytes(), 300).expect("tokenizer");
        tokenizer
            .save(&dir.path().join("tokenizer.json"))
            .expect("save tokenizer");
        let read = |p: &Path| std::fs::read(p).expect("fixture file");
        Files {
            config: read(&dir.path().join("config.json")),
            weights: read(&dir.path().join("model.safetensors")),
            optimizer: read(&dir.path().join("optimizer.safetensors")),
            state: read(&dir.path().join("state.json")),
            hf_config: read(&hf_dir.join("config.json")),
            hf_weights: read(&hf_dir.join("model.safetensors")),
            tokenizer: read(&dir.path().join("tokenizer.json")),
        }
    })
}

/// Loads a training run from the fixture files with one of them replaced;
/// what loads must be finite.
pub fn load_run(weights: &[u8], optimizer: &[u8], state: &[u8]) {
    let dir = Path::new("run");
    if let Ok((trainer, _)) = training_from_bytes(dir, config(), weights, optimizer, state) {
        assert!(trainer.model().params().iter().all(|p| p.is_finite()));
        assert!(trainer.optimizer().v.iter().all(|v| *v >= 0.0));
    }
}

/// Generation from a model that loaded: tokens of the vocabulary or a typed
/// error (a finite but huge weight may overflow the logits to infinity;
/// sampling must then refuse them, not pick from them).
pub fn exercise(model: &mut Model) {
    let vocab = model.config().vocab_size.min(u32::MAX as usize) as u32;
    let prompt: Vec<u32> = (0..3).map(|i| i % vocab).collect();
    if let Ok(tokens) = sampling::generate(model, &prompt, 5, SamplingStrategy::Greedy, 1) {
        assert!(tokens.iter().all(|&t| t < vocab));
    }
}

fn write_seed(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("seed directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

/// Writes the seed corpora of every target into `root/<target>/`: the
/// fixture files and hand-made hostile variants (issue 22's four oversize
/// Hugging Face configs, a NaN value, a cut file). Run by any target when
/// `MOE_FUZZ_WRITE_SEEDS=DIR` is set (see docs/reliability.md).
pub fn write_seeds(root: &Path) {
    let write = |target: &str, name: &str, bytes: &[u8]| write_seed(root, target, name, bytes);
    let f = files();
    write("config", "fixture.json", &f.config);
    let tiny = rosetta_moe::ModelConfig::tiny().to_json();
    write("config", "tiny.json", tiny.as_bytes());
    write("config", "nan.json", tiny.replace("64", "NaN").as_bytes());
    write("hf_config", "fixture.json", &f.hf_config);
    let hf: serde_json::Value = serde_json::from_slice(&f.hf_config).expect("json");
    for (field, value) in [
        ("num_hidden_layers", 1_000_000_000u64),
        ("vocab_size", 4_000_000_000),
        ("num_local_experts", 1 << 31),
        ("intermediate_size", 1_000_000_000_000),
    ] {
        let mut edited = hf.clone();
        edited[field] = value.into();
        write(
            "hf_config",
            &format!("{field}.json"),
            edited.to_string().as_bytes(),
        );
    }
    let text = String::from_utf8(f.hf_config.clone()).expect("utf-8");
    write(
        "hf_config",
        "nan.json",
        text.replace("\"vocab_size\": 32", "\"vocab_size\": NaN")
            .as_bytes(),
    );
    write("weights", "fixture.safetensors", &f.weights);
    write(
        "weights",
        "cut.safetensors",
        &f.weights[..f.weights.len() / 2],
    );
    write("hf_weights", "fixture.safetensors", &f.hf_weights);
    write("optimizer", "fixture.safetensors", &f.optimizer);
    write("train_state", "fixture.json", &f.state);
    write("tokenizer", "fixture.json", &f.tokenizer);
    write(
        "batch",
        "one.json",
        br#"{"ids": [[1, 2, 3]], "targets": [[2, 3, 4]]}"#,
    );
    write(
        "batch",
        "two.json",
        br#"{"ids": [[0, 31], [5, 6]], "targets": [[31, 0], [6, 7]]}"#,
    );
}
