//! Convergence (CONTRACT §11), determinism and checkpoint resume.

pub mod common;

use common::random_batch;
use rosetta_moe::checkpoint::{self, load_model, load_training, save_model, save_training};
use rosetta_moe::dropout::Dropout;
use rosetta_moe::train::{CONVERGENCE_STEPS, convergence_setup};
use rosetta_moe::{Model, ModelConfig, TrainConfig, Trainer};

#[test]
fn convergence_check_reaches_the_contract_floor_and_trains_the_router() {
    let (mut trainer, batch) = convergence_setup().unwrap();
    let layout = trainer.model().layout().clone();
    let routers: Vec<_> = layout.layers.iter().map(|l| l.router.clone()).collect();
    let initial_routers: Vec<Vec<f32>> = routers
        .iter()
        .map(|r| trainer.model().params()[r.clone()].to_vec())
        .collect();
    let experts: Vec<_> = layout
        .layers
        .iter()
        .flat_map(|l| l.experts.iter().map(|e| e.down.clone()))
        .collect();
    let mut expert_got_gradient = vec![false; experts.len()];
    let mut first = None;
    let mut last = None;
    for _ in 0..CONVERGENCE_STEPS {
        let stats = trainer.train_step(&batch).unwrap();
        first.get_or_insert(stats);
        last = Some(stats);
        for (seen, range) in expert_got_gradient.iter_mut().zip(&experts) {
            // m ← β1·m + (1−β1)·g: non-zero once the expert has had a gradient.
            *seen |= trainer.optimizer().m[range.clone()]
                .iter()
                .any(|&m| m != 0.0);
        }
    }
    let (first, last) = (first.unwrap(), last.unwrap());
    assert!(first.loss > 5.0, "initial loss {}", first.loss);
    assert!(last.loss < 0.03, "final total loss {}", last.loss);
    assert!(last.ce < 0.01, "final cross-entropy {}", last.ce);
    for (range, before) in routers.iter().zip(&initial_routers) {
        let after = &trainer.model().params()[range.clone()];
        let moved: f32 = after.iter().zip(before).map(|(a, b)| (a - b).abs()).sum();
        assert!(moved > 1e-2, "router moved by only {moved}");
    }
    assert!(
        expert_got_gradient.iter().all(|&g| g),
        "experts without gradient: {expert_got_gradient:?}"
    );
}

#[test]
fn same_seed_gives_bit_identical_logits_losses_and_weights() {
    let run = || {
        let config = common::gqa_config();
        let mut model = Model::new(config.clone(), 5).unwrap();
        let batch = random_batch(&config, 2, 7, 3);
        let logits = model.forward(&batch.ids, 2).unwrap().to_vec();
        let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
        let losses: Vec<f32> = (0..5)
            .map(|_| trainer.train_step(&batch).unwrap().loss)
            .collect();
        (logits, losses, trainer.model().params().to_vec())
    };
    let (a, b) = (run(), run());
    assert!(
        a.0.iter()
            .zip(&b.0)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert!(
        a.1.iter()
            .zip(&b.1)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert!(
        a.2.iter()
            .zip(&b.2)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    let other = Model::new(common::gqa_config(), 6).unwrap();
    assert_ne!(other.params(), &a.2[..]);
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn model_checkpoint_round_trips_exactly() {
    let dir = tempdir();
    let config = common::gqa_config();
    let mut model = Model::new(config.clone(), 1).unwrap();
    save_model(&model, dir.path()).unwrap();
    let mut loaded = load_model(dir.path()).unwrap();
    assert_eq!(loaded.config(), &config);
    assert_eq!(loaded.params(), model.params());
    let batch = random_batch(&config, 1, 4, 2);
    assert_eq!(
        model.forward(&batch.ids, 1).unwrap(),
        loaded.forward(&batch.ids, 1).unwrap()
    );
}

#[test]
fn resuming_from_a_checkpoint_is_bit_identical_to_never_stopping() {
    resume_matches_straight_run(TrainConfig::default());
}

#[test]
fn a_run_with_dropout_resumes_bit_identically_and_differs_from_one_without() {
    let with = resume_matches_straight_run(TrainConfig {
        dropout: 0.2,
        ..TrainConfig::default()
    });
    let without = resume_matches_straight_run(TrainConfig::default());
    assert_ne!(with, without, "dropout 0.2 changed nothing");
    // p = 0 is the contract's model, to the bit.
    let zero = resume_matches_straight_run(TrainConfig {
        dropout: 0.0,
        ..TrainConfig::default()
    });
    assert_eq!(zero, without);
}

#[test]
fn dropout_applies_to_gradient_passes_only() {
    let config = ModelConfig::tiny();
    let batch = random_batch(&config, 2, 8, 3);
    let mut model = Model::new(config.clone(), 4).unwrap();
    let plain = model.losses(&batch, 0.01).unwrap();
    let dropout = Dropout {
        p: 0.5,
        seed: 1,
        step: 1,
    };
    for bad in [1.0, -0.1, f32::NAN] {
        let refused = model.set_dropout(Some(Dropout { p: bad, ..dropout }));
        assert!(refused.is_err(), "dropout {bad} accepted");
    }
    model.set_dropout(Some(dropout)).unwrap();
    assert_eq!(
        model.losses(&batch, 0.01).unwrap(),
        plain,
        "evaluation dropped"
    );
    let mut grads = vec![0.0; model.params().len()];
    let (trained, _) = model.loss_and_grads(&batch, 0.01, &mut grads).unwrap();
    assert_ne!(trained, plain, "the gradient pass did not drop");
    let same = model
        .losses_with_dropout(&batch, 0.01, Some(dropout))
        .unwrap();
    assert_eq!(same, trained, "the masks are a function of (seed, step)");
    let logits = model.forward(&batch.ids, 2).unwrap().to_vec();
    model.set_dropout(None).unwrap();
    assert_eq!(
        model.forward(&batch.ids, 2).unwrap(),
        &logits[..],
        "inference dropped"
    );
}

/// Trains 20 steps straight and 10 + save + load + 10 under `train`;
/// asserts that both end with the same bits and returns the weights' bits.
fn resume_matches_straight_run(train: TrainConfig) -> Vec<u32> {
    let config = ModelConfig::tiny();
    let batches: Vec<_> = (0..20).map(|i| random_batch(&config, 2, 8, i)).collect();
    let fresh = || Trainer::new(Model::new(config.clone(), 9).unwrap(), train.clone()).unwrap();

    let mut straight = fresh();
    for b in &batches {
        straight.train_step(b).unwrap();
    }

    let dir = tempdir();
    let mut first_half = fresh();
    for b in &batches[..10] {
        first_half.train_step(b).unwrap();
    }
    save_training(&first_half, None, dir.path()).unwrap();
    drop(first_half);
    let (mut resumed, state) = load_training(dir.path()).unwrap();
    assert_eq!(state.step, 10);
    for b in &batches[10..] {
        resumed.train_step(b).unwrap();
    }
    assert_eq!(resumed.step(), 20);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(resumed.model().params()),
        bits(straight.model().params())
    );
    assert_eq!(bits(&resumed.optimizer().m), bits(&straight.optimizer().m));
    assert_eq!(bits(&resumed.optimizer().v), bits(&straight.optimizer().v));
    assert!(dir.path().join(checkpoint::STATE_FILE).exists());
    bits(straight.model().params())
}

#[test]
#[ignore = "allocates about 1.1 GB of weights; run with `cargo test --release -- --ignored`"]
fn default_6_9b_dimensions_with_one_layer_run_a_forward() {
    let config = ModelConfig {
        n_layers: 1,
        ..ModelConfig::default_6_9b()
    };
    let mut model = Model::new(config.clone(), 1).unwrap();
    assert_eq!(model.params().len(), config.param_count());
    let ids: Vec<u32> = (0..16).map(|i| i * 1999 % 32000).collect();
    let logits = model.forward(&ids, 2).unwrap();
    assert_eq!(logits.len(), 16 * 32000);
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn packed_inference_weights_give_the_training_forward_logits_to_the_bit() {
    let config = common::gqa_config();
    let mut model = Model::new(config.clone(), 2).unwrap();
    for (batch, seq) in [(2, 7), (1, 1), (3, 16)] {
        let b = random_batch(&config, batch, seq, 5);
        let inference = model.forward(&b.ids, batch).unwrap().to_vec();
        model.losses(&b, 0.01).unwrap();
        let training = model.logits();
        assert!(
            inference
                .iter()
                .zip(training)
                .all(|(a, t)| a.to_bits() == t.to_bits())
        );
    }
    // Changing a weight through params_mut is seen by the next forward.
    let b = random_batch(&config, 1, 4, 6);
    let before = model.forward(&b.ids, 1).unwrap().to_vec();
    let head = model.layout().lm_head.clone();
    model.params_mut()[head].iter_mut().for_each(|w| *w *= 2.0);
    let after = model.forward(&b.ids, 1).unwrap();
    assert!(
        after
            .iter()
            .zip(&before)
            .all(|(a, b)| (a - 2.0 * b).abs() <= 1e-4 * b.abs().max(1.0))
    );
}

/// The trainer keeps few-token weight gradients as their factors dyᵀ·x and
/// lets the optimizer form them in cache: its steps must be AdamW on the
/// gradients written out by `loss_and_grads` — to the bit with clipping off
/// (the same products, the same kernel), and to rounding with clipping on
/// (the norm then comes from Gram matrices instead of Σ g²).
#[test]
fn training_steps_equal_adamw_on_the_gradients_written_out() {
    use rosetta_moe::optim::{AdamW, clip_scale, learning_rate};
    use rosetta_moe::params::OuterGrads;
    for (clip, bitwise) in [(0.0, true), (0.5, false)] {
        let config = common::gqa_config();
        let batch = random_batch(&config, 2, 8, 11);
        let train = TrainConfig {
            grad_clip: clip,
            ..TrainConfig::default()
        };
        let mut model = Model::new(config, 3).unwrap();
        let mut trainer = Trainer::new(model.clone(), train.clone()).unwrap();
        let layout = model.layout().clone();
        let (mut opt, mut grads) = (AdamW::new(&layout), vec![0.0; layout.len]);
        for t in 1..=3 {
            trainer.train_step(&batch).unwrap();
            let alpha = train.aux_loss_alpha as f32;
            let (_, norm) = model.loss_and_grads(&batch, alpha, &mut grads).unwrap();
            let (scale, lr) = (clip_scale(norm, clip), learning_rate(&train, t));
            opt.update(model.params_mut(), grads[..].into(), scale, lr, t, &train)
                .unwrap();
        }
        let pairs = [
            (trainer.model().params(), model.params()),
            (&trainer.optimizer().m[..], &opt.m[..]),
            (&trainer.optimizer().v[..], &opt.v[..]),
        ];
        for (got, want) in pairs {
            let worst = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs() / (1e-3 + b.abs()))
                .fold(0.0f32, f32::max);
            let same = got
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                if bitwise { same } else { worst < 1e-4 },
                "clip {clip}: {worst}"
            );
        }
        // And the factored path was taken: the LM head's gradient (16 tokens,
        // [V, h]) and the stacked q|k|v are kept as factors.
        let mut factored = OuterGrads::default();
        model
            .loss_and_factored_grads(&batch, 0.01, &mut grads, &mut factored)
            .unwrap();
        assert!(factored.get(&layout.lm_head).is_some());
        assert!(factored.get(&layout.layers[0].qkv).is_some());
    }
}
