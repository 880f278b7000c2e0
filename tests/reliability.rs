//! Nothing saved is lost and nothing non-finite is stored or used (issue 11):
//! checkpoint transactions and their recovery, the refusal of non-finite
//! updates, moments and logits, memory needs refused before allocating.

pub mod common;

use std::fs;
use std::path::Path;

use common::{convergence_batch, random_batch};
use rosetta_moe::checkpoint::{self, load_training, recover, save_training};
use rosetta_moe::optim::AdamW;
use rosetta_moe::sampling::{self, SamplingStrategy};
use rosetta_moe::{Model, ModelConfig, MoeError, TrainConfig, Trainer};

fn trainer() -> Trainer {
    let model = Model::new(ModelConfig::tiny(), 42).unwrap();
    Trainer::new(model, TrainConfig::default()).unwrap()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Simulates a crash after a save's commit point: the new set (step 2) sits
/// in the commit directory and only `moved` of its files have been moved over
/// the old set (step 1).
fn crash_after_commit(dir: &Path, moved: &[&str]) -> Trainer {
    let mut t = trainer();
    t.train_step(&convergence_batch()).unwrap();
    save_training(&t, None, dir).unwrap();
    t.train_step(&convergence_batch()).unwrap();
    let new = tempfile::tempdir().unwrap();
    save_training(&t, None, new.path()).unwrap();
    let commit = dir.join(".checkpoint-commit");
    fs::create_dir(&commit).unwrap();
    for name in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        let to = if moved.contains(&name) {
            dir.join(name)
        } else {
            commit.join(name)
        };
        fs::rename(new.path().join(name), to).unwrap();
    }
    t
}

#[test]
fn a_save_interrupted_after_its_commit_point_is_read_whole_and_rolled_forward() {
    for moved in [
        &[][..],
        &["config.json", "model.safetensors"],
        &["config.json", "model.safetensors", "optimizer.safetensors"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let expected = crash_after_commit(dir.path(), moved);
        // A reader sees the complete new set without writing anything.
        let (read, state) = load_training(dir.path()).unwrap();
        assert_eq!(state.step, 2, "moved {moved:?}");
        assert_eq!(bits(read.model().params()), bits(expected.model().params()));
        assert!(dir.path().join(".checkpoint-commit").exists());
        // The writer's recovery finishes the move.
        recover(dir.path()).unwrap();
        assert!(!dir.path().join(".checkpoint-commit").exists());
        let (read, state) = load_training(dir.path()).unwrap();
        assert_eq!(state.step, 2);
        assert_eq!(read.optimizer(), expected.optimizer());
    }
}

#[test]
fn an_uncommitted_save_and_stray_temporaries_are_cleaned_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer();
    t.train_step(&convergence_batch()).unwrap();
    save_training(&t, None, dir.path()).unwrap();
    let before = fs::read(dir.path().join("model.safetensors")).unwrap();
    let staging = dir.path().join(".checkpoint-new");
    fs::create_dir(&staging).unwrap();
    fs::write(staging.join("model.safetensors"), b"half a file").unwrap();
    fs::write(dir.path().join(".tmpAbC123"), vec![0u8; 4096]).unwrap();
    assert_eq!(load_training(dir.path()).unwrap().1.step, 1);
    recover(dir.path()).unwrap();
    let mut left: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "state.json"
        ]
    );
    assert_eq!(
        fs::read(dir.path().join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let first = checkpoint::lock(dir.path()).unwrap();
    // flock locks belong to the open file description: a second open in the
    // same process conflicts just as another process would.
    let err = checkpoint::lock(dir.path()).unwrap_err();
    assert!(matches!(err, MoeError::DirectoryBusy { .. }), "{err}");
    assert!(err.to_string().contains("in use by another"), "{err}");
    drop(first);
    checkpoint::lock(dir.path()).unwrap();
}

#[test]
fn negative_or_non_finite_moments_are_refused_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer();
    t.train_step(&convergence_batch()).unwrap();
    save_training(&t, None, dir.path()).unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let clean = fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&clean).unwrap();
    let name = "layers.0.attn_norm.weight.v";
    let view = file.tensor(name).unwrap();
    // Offset of the tensor's first value in the file bytes.
    let start = view.data().as_ptr() as usize - clean.as_ptr() as usize;
    for (value, reason) in [
        (-1.0f32, "negative second moment"),
        (f32::NAN, "non-finite"),
    ] {
        let mut bytes = clean.clone();
        bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        match load_training(dir.path()) {
            Err(MoeError::Checkpoint { reason: r, .. }) => assert!(r.contains(reason), "{r}"),
            other => panic!("{value}: {other:?}"),
        }
    }
}

#[test]
fn an_update_that_would_overflow_is_refused_with_weights_and_moments_untouched() {
    let mut t = trainer();
    t.train_step(&convergence_batch()).unwrap();
    // Finite in f64, beyond f32: the update itself overflows.
    let wild = TrainConfig {
        lr: 3.5e38,
        warmup_steps: 0,
        ..TrainConfig::default()
    };
    t.set_config(wild).unwrap();
    let (params, moments) = (bits(t.model().params()), t.optimizer().clone());
    match t.train_step(&convergence_batch()) {
        Err(MoeError::NonFinite {
            what: "weights",
            step: 2,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(t.step(), 1);
    assert_eq!(bits(t.model().params()), params);
    assert_eq!(t.optimizer(), &moments);
    // A second moment that would overflow f32: g² with g = 1e20.
    let layout = t.model().layout().clone();
    let mut opt = AdamW::new(&layout);
    let mut params = t.model().params().to_vec();
    let before = bits(&params);
    let mut grads = vec![0.0f32; layout.len];
    grads[layout.len - 1] = 1e20;
    let config = TrainConfig::default();
    assert_eq!(
        opt.update(&mut params, grads[..].into(), 1.0, 1e-3, 1, &config),
        Err("moments")
    );
    assert_eq!(bits(&params), before);
    assert!(opt.m.iter().chain(opt.v.iter()).all(|&x| x == 0.0));
    grads[layout.len - 1] = 1e10;
    opt.update(&mut params, grads[..].into(), 1.0, 1e-3, 1, &config)
        .unwrap();
    assert_ne!(bits(&params), before);
}

#[test]
fn sampling_refuses_non_finite_logits() {
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let logits = [0.5, bad, 1.0];
        for strategy in [
            SamplingStrategy::Greedy,
            SamplingStrategy::TopP { p: 0.9, t: 0.8 },
        ] {
            assert!(matches!(
                sampling::pick_token(&logits, strategy, &mut rng),
                Err(MoeError::NonFiniteValue { what: "logits" })
            ));
        }
    }
    // A diverged model (finite but huge weights) generates no garbage.
    let mut model = Model::new(ModelConfig::tiny(), 42).unwrap();
    let head = model.layout().lm_head.clone();
    model.params_mut()[head].iter_mut().for_each(|w| *w = 3e38);
    assert!(matches!(
        sampling::generate_greedy(&mut model, &[1, 2, 3], 6),
        Err(MoeError::NonFiniteValue { what: "logits" })
    ));
}

#[test]
fn routes_after_an_inference_forward_are_not_reported() {
    let config = ModelConfig::tiny();
    let mut model = Model::new(config.clone(), 42).unwrap();
    model.losses(&random_batch(&config, 1, 4, 1), 0.01).unwrap();
    assert_eq!(model.routes(1).unwrap().len(), 4 * config.top_k);
    // Longer than the training forward: routes must not index past it.
    model
        .forward(&random_batch(&config, 2, 16, 2).ids, 2)
        .unwrap();
    assert_eq!(model.routes(0), None);
    assert_eq!(model.routes(1), None);
    assert_eq!(model.routes(2), None);
}

#[test]
fn min_lr_ratio_is_kept_by_a_checkpoint_and_defaults_for_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let train = TrainConfig {
        min_lr_ratio: 0.25,
        ..TrainConfig::default()
    };
    let model = Model::new(ModelConfig::tiny(), 42).unwrap();
    save_training(&Trainer::new(model, train).unwrap(), None, dir.path()).unwrap();
    let (trainer, state) = load_training(dir.path()).unwrap();
    assert_eq!(state.train.min_lr_ratio, 0.25);
    assert_eq!(trainer.config().min_lr_ratio, 0.25);
    // A state.json written before the field existed loads with 0.1.
    let path = dir.path().join(checkpoint::STATE_FILE);
    let mut json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    json["train"]
        .as_object_mut()
        .unwrap()
        .remove("min_lr_ratio")
        .unwrap();
    fs::write(&path, json.to_string()).unwrap();
    let (trainer, _) = load_training(dir.path()).unwrap();
    assert_eq!(trainer.config().min_lr_ratio, 0.1);
}

#[test]
fn the_inference_need_counts_the_packed_copy_of_the_weights() {
    let config = ModelConfig::tiny();
    let mut model = Model::new(config.clone(), 1).unwrap();
    // Every weight but the embedding and the RMSNorm gains is packed.
    let h = config.hidden_dim;
    let gains = (2 * config.n_layers + 1) * h;
    let linear = (config.param_count() - config.vocab_size * h - gains) as u64;
    let need = model.inference_bytes().unwrap();
    let packed = need - config.model_bytes();
    assert!(packed >= 4 * linear, "{packed} < {}", 4 * linear);
    assert!(packed < 8 * linear, "padding only: {packed}");
    // The check sits before the copy is built: inference still runs.
    model.forward(&[1, 2, 3], 1).unwrap();
}

#[test]
fn impossible_sizes_are_refused_before_allocating() {
    let huge_seq = ModelConfig {
        max_seq_len: 1 << 40,
        ..ModelConfig::tiny()
    };
    match Model::new(huge_seq, 1) {
        Err(MoeError::OutOfMemory { need, .. }) => assert!(need > 1 << 40),
        other => panic!("{other:?}"),
    }
    for overflowing in [
        ModelConfig {
            max_seq_len: 1 << 62,
            ..ModelConfig::tiny()
        },
        ModelConfig {
            n_experts: 1_000_000_000,
            ffn_dim: 1 << 31,
            ..ModelConfig::tiny()
        },
    ] {
        assert!(matches!(
            Model::new(overflowing, 1),
            Err(MoeError::InvalidConfig(_))
        ));
    }
    let config = ModelConfig::tiny();
    assert_eq!(config.activation_bytes(usize::MAX, 2, 2, true), None);
    let mut model = Model::new(config.clone(), 1).unwrap();
    // 2^24 sequences of one token: ids fit easily (64 MB), their logits
    // (67 GB) do not on a test machine.
    let ids = vec![0u32; 1 << 24];
    let need = config.activation_bytes(1 << 24, 1, 1, false).unwrap();
    assert!(need > 67_000_000_000);
    if rosetta_moe::memory::available().is_some_and(|a| a < need) {
        assert!(matches!(
            model.forward(&ids, 1 << 24),
            Err(MoeError::OutOfMemory { .. })
        ));
    }
}
