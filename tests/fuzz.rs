//! Properties over every public entry point and parser: any input gives a
//! value or a typed `MoeError`, never a panic, and nothing non-finite comes out.
//!
//! Light by default (`FUZZ_CASES` unset: 64–256 cases per property). The full
//! run of docs/reliability.md:
//!
//! ```text
//! FUZZ_CASES=100000 cargo test --release --test fuzz
//! ```

pub mod common;

use std::fs;
use std::sync::OnceLock;

use proptest::prelude::*;
use rosetta_moe::checkpoint::{load_model, load_training, save_training};
use rosetta_moe::sampling::{self, SamplingStrategy};
use rosetta_moe::{Batch, Model, ModelConfig, Tokenizer, TrainConfig, Trainer};

/// Cases per property: `FUZZ_CASES` if set, else `light`.
fn cases(light: u32) -> ProptestConfig {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(light);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A model small enough for thousands of forwards: V 40, S ≤ 12.
fn small() -> ModelConfig {
    ModelConfig {
        hidden_dim: 16,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        n_experts: 3,
        top_k: 2,
        ffn_dim: 16,
        vocab_size: 40,
        max_seq_len: 12,
        ..ModelConfig::tiny()
    }
}

/// A saved training checkpoint of `small()`: its four files' bytes.
fn checkpoint_files() -> &'static Vec<(&'static str, Vec<u8>)> {
    static FILES: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(Model::new(small(), 3).unwrap(), TrainConfig::default()).unwrap();
        t.train_step(&common::random_batch(&small(), 2, 4, 1))
            .unwrap();
        save_training(&t, None, dir.path()).unwrap();
        [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "state.json",
        ]
        .into_iter()
        .map(|name| (name, fs::read(dir.path().join(name)).unwrap()))
        .collect()
    })
}

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::train(
            b"the quick brown fox jumps over the lazy dog "
                .repeat(20)
                .as_slice(),
            300,
        )
        .unwrap()
    })
}

/// Sizes a user could type: small, at the edges, and absurd.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..=8,
        Just(512),
        Just(1 << 31),
        Just(1 << 62),
        Just(u64::MAX),
        any::<u64>()
    ]
}

/// Floats including every special value.
fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        -4.0f32..4.0,
        Just(0.0),
        Just(1e-6),
        Just(1e6),
        Just(1e4),
        Just(-1e4),
        Just(f32::MAX),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        any::<f32>()
    ]
}

fn strategy() -> impl Strategy<Value = SamplingStrategy> {
    prop_oneof![
        Just(SamplingStrategy::Greedy),
        float().prop_map(|t| SamplingStrategy::Temperature { t }),
        (0usize..50, float()).prop_map(|(k, t)| SamplingStrategy::TopK { k, t }),
        (float(), float()).prop_map(|(p, t)| SamplingStrategy::TopP { p, t }),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    /// Config JSON with any sizes: a config (whose model builds when small) or
    /// a typed error.
    #[test]
    fn config_parsing(sizes in proptest::collection::vec(size(), 10), base in float(), alpha in float()) {
        let names = ["hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "n_experts",
            "top_k", "ffn_dim", "vocab_size", "max_seq_len"];
        let mut json: serde_json::Map<String, serde_json::Value> = names.iter().zip(&sizes)
            .map(|(n, s)| (n.to_string(), (*s).into())).collect();
        json.insert("rope_base".into(), serde_json::json!(base));
        json.insert("rope_alpha".into(), serde_json::json!(alpha));
        if let Ok(config) = ModelConfig::from_json(&serde_json::Value::Object(json).to_string())
            && config.model_bytes() < 50_000_000
        {
            let _ = Model::new(config, 1);
        }
    }

    /// Damaged checkpoint files (bytes flipped, cut or appended): the checkpoint
    /// loads or gives a typed error.
    #[test]
    fn checkpoint_parsing(file in 0usize..4, at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        for (i, (name, bytes)) in checkpoint_files().iter().enumerate() {
            let mut bytes = bytes.clone();
            if i == file {
                let at = at.index(bytes.len());
                if cut { bytes.truncate(at) } else { bytes[at] = byte }
            }
            fs::write(dir.path().join(name), bytes).unwrap();
        }
        let _ = load_training(dir.path());
        let _ = load_model(dir.path());
    }

    /// A damaged tokenizer.json loads or gives a typed error.
    #[test]
    fn tokenizer_parsing(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tokenizer().save(&path).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let at = at.index(bytes.len());
        bytes[at] = byte;
        fs::write(&path, bytes).unwrap();
        let _ = Tokenizer::load(&path);
    }

    /// Any bytes encode and decode back; any ids (≥ V too) decode.
    #[test]
    fn encode_decode(bytes in proptest::collection::vec(any::<u8>(), 0..200), ids in proptest::collection::vec(any::<u32>(), 0..50)) {
        let t = tokenizer();
        prop_assert_eq!(t.decode(&t.encode(&bytes).unwrap()), bytes);
        let _ = t.decode(&ids);
    }

    /// Forward and a training step on any shape (0, 1, max, max + 1) and any
    /// ids (≥ V too): finite logits and losses, or a typed error.
    #[test]
    fn forward_and_train_step(batch in 0usize..4, seq in 0usize..14, ids in proptest::collection::vec(prop_oneof![0u32..40, 40u32..42, Just(u32::MAX)], 0..60), lr in float()) {
        let mut model = Model::new(small(), 5).unwrap();
        let n = (batch * seq).min(ids.len());
        let ids = &ids[..n];
        if let Ok(logits) = model.forward(ids, batch) {
            prop_assert!(logits.iter().all(|z| z.is_finite()));
        }
        let targets: Vec<u32> = ids.iter().rev().copied().collect();
        if let Ok(b) = Batch::new(ids.to_vec(), targets, batch) {
            let train = TrainConfig { lr: f64::from(lr), ..TrainConfig::default() };
            if let Ok(mut trainer) = Trainer::new(model, train) {
                let before = trainer.model().params().to_vec();
                match trainer.train_step(&b) {
                    Ok(stats) => prop_assert!(stats.loss.is_finite()),
                    Err(_) => prop_assert_eq!(trainer.model().params(), &before[..]),
                }
                prop_assert!(trainer.model().params().iter().all(|p| p.is_finite()));
            }
        }
    }

    /// Sampling with any logits (±1e4, all equal, NaN, ∞) and any parameters:
    /// an id below V or a typed error.
    #[test]
    fn sampling_any_logits(logits in proptest::collection::vec(float(), 0..50), strategy in strategy(), seed in any::<u64>()) {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        if let Ok(id) = sampling::pick_token(&logits, strategy, &mut rng) {
            prop_assert!((id as usize) < logits.len());
        }
    }

    /// Generation with any prompt (empty, ≥ V, longer than max) and length.
    #[test]
    fn generation(prompt in proptest::collection::vec(prop_oneof![0u32..40, Just(40u32)], 0..14), max_len in prop_oneof![0usize..15, Just(usize::MAX)], strategy in strategy(), seed in any::<u64>()) {
        let mut model = Model::new(small(), 5).unwrap();
        if let Ok(tokens) = sampling::generate(&mut model, &prompt, max_len, strategy, seed) {
            prop_assert_eq!(tokens.len(), max_len);
            prop_assert!(tokens.iter().all(|&t| t < 40));
        }
    }
}
