//! Every error case of CONTRACT §8 gives its typed error, never a panic.

pub mod common;

use std::fs;

use common::{convergence_batch, random_batch};
use rosetta_moe::checkpoint::{self, load_model, load_training, save_training};
use rosetta_moe::{Batch, KvCache, Model, ModelConfig, MoeError, TrainConfig, Trainer};

fn tiny() -> Model {
    Model::new(ModelConfig::tiny(), 42).unwrap()
}

#[test]
fn empty_inputs() {
    let mut model = tiny();
    assert!(matches!(
        model.forward(&[], 1),
        Err(MoeError::EmptyInput(_))
    ));
    assert!(matches!(
        model.forward(&[1, 2], 0),
        Err(MoeError::EmptyInput(_))
    ));
    assert!(matches!(
        Batch::new(vec![], vec![], 1),
        Err(MoeError::EmptyInput(_))
    ));
    let mut cache = KvCache::new(model.config(), 8);
    assert!(matches!(
        model.forward_cached(&[], &mut cache),
        Err(MoeError::EmptyInput(_))
    ));
}

#[test]
fn token_and_target_ids_beyond_the_vocabulary() {
    let mut model = tiny();
    match model.forward(&[1, 1000, 3, 4], 2) {
        Err(MoeError::TokenOutOfRange {
            what: "token",
            id: 1000,
            position: 1,
            vocab_size: 1000,
        }) => {}
        other => panic!("{other:?}"),
    }
    let batch = Batch::new(vec![1, 2], vec![3, 5000], 1).unwrap();
    let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
    assert!(matches!(
        trainer.train_step(&batch),
        Err(MoeError::TokenOutOfRange {
            what: "target",
            id: 5000,
            ..
        })
    ));
    assert_eq!(trainer.step(), 0);
}

#[test]
fn sequences_longer_than_max_seq_len() {
    let config = ModelConfig {
        max_seq_len: 8,
        ..ModelConfig::tiny()
    };
    let mut model = Model::new(config.clone(), 1).unwrap();
    assert!(matches!(
        model.forward(&[0; 9], 1),
        Err(MoeError::SequenceTooLong { len: 9, max: 8 })
    ));
    assert!(model.forward(&[0; 16], 2).is_ok());
    let mut cache = KvCache::new(&config, 100);
    assert_eq!(cache.capacity(), 8);
    model.forward_cached(&[0; 6], &mut cache).unwrap();
    assert!(matches!(
        model.forward_cached(&[0; 3], &mut cache),
        Err(MoeError::SequenceTooLong { len: 9, max: 8 })
    ));
}

#[test]
fn mismatched_shapes() {
    let mut model = tiny();
    assert!(matches!(
        model.forward(&[1, 2, 3], 2),
        Err(MoeError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        Batch::new(vec![1, 2, 3], vec![1, 2], 1),
        Err(MoeError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        Batch::new(vec![1, 2, 3], vec![1, 2, 3], 2),
        Err(MoeError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        Batch::from_rows(&[vec![1, 2], vec![3]], &[vec![1, 2], vec![3]]),
        Err(MoeError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        Model::from_params(ModelConfig::tiny(), vec![0.0; 10]),
        Err(MoeError::ShapeMismatch { .. })
    ));
    let mut grads = vec![0.0; 3];
    assert!(matches!(
        model.loss_and_grads(&convergence_batch(), 0.01, &mut grads),
        Err(MoeError::ShapeMismatch { .. })
    ));
    let mut wrong_cache = KvCache::new(&ModelConfig::small(), 8);
    assert!(matches!(
        model.forward_cached(&[1], &mut wrong_cache),
        Err(MoeError::ShapeMismatch { .. })
    ));
}

#[test]
fn invalid_configs() {
    let base = ModelConfig::tiny();
    let cases = [
        ModelConfig {
            head_dim: 8,
            ..base.clone()
        },
        ModelConfig {
            n_kv_heads: 3,
            ..base.clone()
        },
        ModelConfig {
            top_k: 5,
            ..base.clone()
        },
        ModelConfig {
            n_layers: 0,
            ..base.clone()
        },
        ModelConfig {
            vocab_size: 0,
            ..base.clone()
        },
        ModelConfig {
            hidden_dim: 60,
            n_heads: 4,
            head_dim: 15,
            ..base.clone()
        },
        ModelConfig {
            rope_base: f64::NAN,
            ..base.clone()
        },
        ModelConfig {
            rope_alpha: -1.0,
            ..base.clone()
        },
        ModelConfig {
            rms_norm_eps: 0.0,
            ..base.clone()
        },
        ModelConfig {
            n_experts: usize::MAX / 2,
            ..base.clone()
        },
    ];
    for config in cases {
        assert!(
            matches!(config.validate(), Err(MoeError::InvalidConfig(_))),
            "{config:?}"
        );
        assert!(matches!(
            Model::new(config, 1),
            Err(MoeError::InvalidConfig(_))
        ));
    }
    let mut json: serde_json::Value = serde_json::from_str(&base.to_json()).unwrap();
    json["extra_key"] = 1.into();
    assert!(matches!(
        ModelConfig::from_json(&json.to_string()),
        Err(MoeError::Json { .. })
    ));
    assert!(matches!(
        ModelConfig::from_json("{\"hidden_dim\": 64}"),
        Err(MoeError::Json { .. })
    ));
    assert!(matches!(
        ModelConfig::preset("huge"),
        Err(MoeError::InvalidConfig(_))
    ));
    assert!(matches!(
        TrainConfig::from_json("{\"beta1\": 1.5}"),
        Err(MoeError::InvalidTraining(_))
    ));
    assert!(matches!(
        TrainConfig::from_json("{\"lr\": 1, \"typo\": 2}"),
        Err(MoeError::Json { .. })
    ));
    for ratio in ["-0.1", "1.5"] {
        assert!(matches!(
            TrainConfig::from_json(&format!("{{\"min_lr_ratio\": {ratio}}}")),
            Err(MoeError::InvalidTraining(m)) if m.contains("min_lr_ratio")
        ));
    }
    for ratio in ["0", "1"] {
        TrainConfig::from_json(&format!("{{\"min_lr_ratio\": {ratio}}}")).unwrap();
    }
}

#[test]
fn the_default_6_9b_config_is_valid_and_counted_without_overflow() {
    let config = ModelConfig::default_6_9b();
    config.validate().unwrap();
    assert_eq!(config.param_count(), 6_882_678_528);
}

fn saved_checkpoint() -> (tempfile::TempDir, Trainer) {
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(tiny(), TrainConfig::default()).unwrap();
    trainer.train_step(&convergence_batch()).unwrap();
    save_training(&trainer, None, dir.path()).unwrap();
    (dir, trainer)
}

fn checkpoint_reason(err: MoeError) -> String {
    match err {
        MoeError::Checkpoint { reason, .. } => reason,
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn truncated_or_corrupt_checkpoints() {
    let (dir, _) = saved_checkpoint();
    let model_file = dir.path().join(checkpoint::MODEL_FILE);
    let bytes = fs::read(&model_file).unwrap();
    fs::write(&model_file, &bytes[..bytes.len() / 2]).unwrap();
    let reason = checkpoint_reason(load_model(dir.path()).unwrap_err());
    assert!(reason.contains("truncated or corrupt"), "{reason}");
    fs::write(&model_file, b"not a safetensors file at all").unwrap();
    checkpoint_reason(load_model(dir.path()).unwrap_err());
    fs::remove_file(&model_file).unwrap();
    let reason = checkpoint_reason(load_model(dir.path()).unwrap_err());
    assert!(reason.contains("cannot read"), "{reason}");
    fs::write(dir.path().join(checkpoint::CONFIG_FILE), "{ not json").unwrap();
    // Not JSON at all: a syntax error with its position (issue 22).
    assert!(matches!(
        load_model(dir.path()).unwrap_err(),
        MoeError::JsonSyntax { line: 1, .. }
    ));
    checkpoint_reason(load_model(&dir.path().join("missing")).unwrap_err());
}

#[test]
fn checkpoints_of_another_config_are_refused_by_name_and_shape() {
    let (dir, _) = saved_checkpoint();
    // Same names, other shapes: a config claiming a larger FFN.
    let bigger = ModelConfig {
        ffn_dim: 128,
        ..ModelConfig::tiny()
    };
    fs::write(dir.path().join(checkpoint::CONFIG_FILE), bigger.to_json()).unwrap();
    let reason = checkpoint_reason(load_model(dir.path()).unwrap_err());
    assert!(reason.contains("shape"), "{reason}");
    // Other names: a config with one layer more.
    let deeper = ModelConfig {
        n_layers: 3,
        ..ModelConfig::tiny()
    };
    fs::write(dir.path().join(checkpoint::CONFIG_FILE), deeper.to_json()).unwrap();
    let reason = checkpoint_reason(load_model(dir.path()).unwrap_err());
    assert!(reason.contains("missing tensors"), "{reason}");
    let fewer = ModelConfig {
        n_layers: 1,
        ..ModelConfig::tiny()
    };
    fs::write(dir.path().join(checkpoint::CONFIG_FILE), fewer.to_json()).unwrap();
    let reason = checkpoint_reason(load_model(dir.path()).unwrap_err());
    assert!(reason.contains("unexpected tensors"), "{reason}");
}

#[test]
fn checkpoint_files_from_different_saves_are_detected() {
    let (dir, mut trainer) = saved_checkpoint();
    let other = tempfile::tempdir().unwrap();
    trainer.train_step(&convergence_batch()).unwrap();
    save_training(&trainer, None, other.path()).unwrap();
    fs::copy(
        other.path().join(checkpoint::OPTIMIZER_FILE),
        dir.path().join(checkpoint::OPTIMIZER_FILE),
    )
    .unwrap();
    let reason = checkpoint_reason(load_training(dir.path()).unwrap_err());
    assert!(reason.contains("different saves"), "{reason}");
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint_intact() {
    let (dir, mut trainer) = saved_checkpoint();
    let before = fs::read(dir.path().join(checkpoint::MODEL_FILE)).unwrap();
    let batch = random_batch(&ModelConfig::tiny(), 2, 8, 2);
    trainer.train_step(&batch).unwrap();
    // A file where the save's commit directory must go: the whole new set is
    // written and synced, then the commit rename fails.
    let blocker = dir.path().join(".checkpoint-commit");
    fs::write(&blocker, b"in the way").unwrap();
    let err = save_training(&trainer, None, dir.path()).unwrap_err();
    assert!(
        matches!(err, MoeError::Io { ref path, .. } if path == &blocker),
        "{err}"
    );
    assert_eq!(
        fs::read(dir.path().join(checkpoint::MODEL_FILE)).unwrap(),
        before
    );
    assert!(
        !dir.path().join(".checkpoint-new").exists(),
        "partial set left behind"
    );
    let (loaded, state) = load_training(dir.path()).unwrap();
    assert_eq!(state.step, trainer.step() - 1);
    assert_eq!(loaded.step(), state.step);
    // Once the obstacle is gone the same save succeeds.
    fs::remove_file(&blocker).unwrap();
    save_training(&trainer, None, dir.path()).unwrap();
    assert_eq!(load_training(dir.path()).unwrap().1.step, trainer.step());
}

#[test]
fn non_finite_loss_refuses_the_step_and_leaves_weights_untouched() {
    let config = ModelConfig::tiny();
    let mut model = tiny();
    let head = model.layout().lm_head.clone();
    model.params_mut()[head.start] = f32::INFINITY;
    let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
    let before = trainer.model().params().to_vec();
    let batch = random_batch(&config, 2, 8, 1);
    assert!(matches!(
        trainer.train_step(&batch),
        Err(MoeError::NonFinite { step: 1, .. })
    ));
    assert_eq!(trainer.step(), 0);
    assert!(
        trainer
            .model()
            .params()
            .iter()
            .zip(&before)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(trainer.optimizer().m.iter().all(|&m| m == 0.0));
}
