//! One training step: forward → loss → backward → clip → AdamW (CONTRACT §6).

use crate::batch::Batch;
use crate::config::{ModelConfig, TrainConfig};
use crate::dropout::Dropout;
use crate::error::{MoeError, Result};
use crate::kernels::{Buffer, Stream};
use crate::model::{Losses, Model};
use crate::optim::{self, AdamW};
use crate::params::{Gradients, OuterGrads};

/// What one training step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Total loss before the update, L_ce + Σ L_aux.
    pub loss: f32,
    /// Cross-entropy part.
    pub ce: f32,
    /// Load-balancing part (all layers).
    pub aux: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Learning rate used for this step.
    pub lr: f64,
}

/// A model with its gradient buffer, optimizer state and step counter.
#[derive(Debug, Clone)]
pub struct Trainer {
    model: Model,
    config: TrainConfig,
    /// Gradients written out (norms, embedding, and weights seen by many tokens).
    grads: Buffer,
    /// Linear weights' gradients kept as factors dyᵀ·x (few tokens).
    factored: OuterGrads,
    optimizer: AdamW,
    step: u64,
    /// The moments came from this trainer's own finite updates (not from a
    /// caller or a file), so [`update_stays_finite`] may vouch for the next one.
    moments_checked: bool,
}

/// True when one AdamW update from finite weights and moments that this
/// trainer produced is provably finite, so the dry run can be skipped:
/// with |s·g| ≤ s·‖g‖ ≤ 1e18, g'² ≤ 1e36 is finite, and m ← β1·m + (1−β1)·g',
/// v ← β2·v + (1−β2)·g'² are convex combinations of finite values (so |m| and
/// v stay below 1e36 from zero moments); then |m̂/(√v̂ + ε)| ≤ 10·|m|/ε with
/// β1 ≥ 0.9's bias correction ≤ 10 — below 1e36·10/1e-12 — and with lr ≤ 1
/// and lr·wd ≤ 1 the new weight p·(1 − lr·wd) − lr·(…) stays finite unless p
/// itself is within a hair of f32::MAX (such weights overflow the loss first).
/// Anything else (a large lr, no clipping with a huge gradient, a tiny ε,
/// moments from outside) runs the dry run.
fn update_stays_finite(config: &TrainConfig, lr: f64, scaled_norm: f32) -> bool {
    lr <= 1.0
        && lr * config.weight_decay <= 1.0
        && f64::from(scaled_norm) <= 1e18
        && config.eps >= 1e-12
        && config.beta1 >= 0.9
}

/// The divergence rule: a model whose cross-entropy exceeds this many times
/// ln V — the loss of a uniform guess over the V tokens — has diverged. A
/// fresh He-initialised model starts within about one nat of ln V (its
/// logits have variance ≈ 2, adding ≈ σ²/2), training only lowers it, and
/// 4·ln V means the targets get, on average, probability V⁻⁴: far worse than
/// guessing, which only a blown-up update produces (at lr 10 the tiny model's
/// loss passes 10·ln V in two steps). 4·ln V ≥ ln V + 1 for every V ≥ 2, so a
/// fresh model never trips it.
pub const DIVERGENCE_FACTOR: f32 = 4.0;

/// Cross-entropy (nats/token) above which a model with vocabulary `vocab`
/// has diverged: DIVERGENCE_FACTOR·ln V.
pub fn divergence_limit(vocab: usize) -> f32 {
    DIVERGENCE_FACTOR * (vocab as f32).ln()
}

impl Trainer {
    /// A trainer at step 0 with zeroed optimizer moments.
    pub fn new(model: Model, config: TrainConfig) -> Result<Self> {
        ensure_training_fits(model.config(), 3)?;
        let optimizer = AdamW::new(model.layout());
        Self::resume(model, config, optimizer, 0)
    }

    /// A trainer for a fresh model of `model_config` initialised from
    /// `config.seed` (CONTRACT §2): same seed, same run.
    pub fn from_seed(model_config: ModelConfig, config: TrainConfig) -> Result<Self> {
        let model = Model::new(model_config, config.seed)?;
        Self::new(model, config)
    }

    /// A trainer continuing from saved optimizer state after `step` steps.
    pub fn resume(model: Model, config: TrainConfig, optimizer: AdamW, step: u64) -> Result<Self> {
        config.validate()?;
        let n = model.params().len();
        if optimizer.m.len() != n || optimizer.v.len() != n {
            return Err(MoeError::shape("optimizer moments", n, optimizer.m.len()));
        }
        ensure_training_fits(model.config(), 1)?;
        Ok(Trainer {
            grads: Buffer::zeroed(n, Stream::Gradients),
            factored: OuterGrads::default(),
            model,
            config,
            optimizer,
            step,
            moments_checked: false,
        })
    }

    /// One step on `batch`. A non-finite loss or gradient, or an update that
    /// would make a weight or moment non-finite, refuses the step with
    /// [`MoeError::NonFinite`]; a cross-entropy above [`divergence_limit`]
    /// refuses it with [`MoeError::Diverged`]. A refused step leaves weights,
    /// moments and the step counter as they were.
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepStats> {
        let t = self.step + 1;
        let alpha = self.config.aux_loss_alpha as f32;
        let config = self.model.config();
        let bound = OuterGrads::bound(self.model.layout(), batch.tokens(), config.top_k);
        self.factored
            .reserve(bound, self.model.layout().tensors.len());
        // A fresh dropout mask each step, a function of (seed, step) alone.
        self.model.set_dropout(Some(Dropout {
            p: self.config.dropout as f32,
            seed: self.config.seed,
            step: t,
        }))?;
        let (losses, grad_norm) = self
            .model
            .loss_and_factored_grads(batch, alpha, &mut self.grads, &mut self.factored)
            .map_err(|e| match e {
                MoeError::NonFiniteValue { what } => MoeError::NonFinite { what, step: t },
                other => other,
            })?;
        self.check_divergence(losses.ce, t)?;
        self.apply_gradients(losses, grad_norm)
    }

    /// The divergence rule on the current weights — their cross-entropy on
    /// `batch`, one forward — charged to the step that produced them. A step's
    /// own loss is measured before its update, so `moe train` runs this before
    /// every save: no checkpoint holds a diverged model.
    pub fn check_weights(&mut self, batch: &Batch) -> Result<()> {
        let ce = self.model.losses(batch, 0.0)?.ce;
        self.check_divergence(ce, self.step)
    }

    /// [`MoeError::Diverged`] for step `step` when `ce` exceeds the limit.
    fn check_divergence(&self, ce: f32, step: u64) -> Result<()> {
        let limit = divergence_limit(self.model.config().vocab_size);
        if ce > limit {
            return Err(MoeError::Diverged { step, ce, limit });
        }
        Ok(())
    }

    /// Clips the gradients in `self.grads` and `self.factored` (whose global norm is `grad_norm`)
    /// and takes one AdamW step, unless the norm or the update's result is not
    /// finite.
    fn apply_gradients(&mut self, losses: Losses, grad_norm: f32) -> Result<StepStats> {
        let t = self.step + 1;
        if !grad_norm.is_finite() {
            return Err(MoeError::NonFinite {
                what: "gradient",
                step: t,
            });
        }
        let lr = optim::learning_rate(&self.config, t);
        let scale = optim::clip_scale(grad_norm, self.config.grad_clip);
        let grads = Gradients {
            values: &self.grads,
            factored: &self.factored,
        };
        let (params, config) = (self.model.params_mut(), &self.config);
        if self.moments_checked && update_stays_finite(config, lr, scale * grad_norm) {
            self.optimizer
                .update_unchecked(params, grads, scale, lr, t, config);
        } else {
            self.optimizer
                .update(params, grads, scale, lr, t, config)
                .map_err(|what| MoeError::NonFinite { what, step: t })?;
        }
        self.moments_checked = true;
        self.step = t;
        Ok(StepStats {
            loss: losses.total(),
            ce: losses.ce,
            aux: losses.aux,
            grad_norm,
            lr,
        })
    }

    /// Steps completed so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model being trained, mutably (e.g. for evaluation forwards).
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.model
    }

    /// The training hyper-parameters.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Replaces the training hyper-parameters (e.g. a longer schedule when a
    /// resumed run is extended); the step counter and moments are kept.
    pub fn set_config(&mut self, config: TrainConfig) -> Result<()> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// The optimizer state (moments).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Gives back the model.
    pub fn into_model(self) -> Model {
        self.model
    }
}

/// Refuses a trainer whose `copies` more weight-sized buffers (gradients,
/// moments) do not fit in memory.
fn ensure_training_fits(config: &crate::ModelConfig, copies: u64) -> Result<()> {
    crate::memory::ensure_fits(
        || format!("training a model of {} parameters", config.param_count()),
        config.weight_bytes().checked_mul(copies),
        "",
    )
}

/// The convergence check of CONTRACT §11: the tiny model (seed 42), default
/// training settings, and the fixed batch B 2 × S 8 with ids 0..15 and
/// targets 1..16. Returns the trainer and the batch to repeat.
pub fn convergence_setup() -> Result<(Trainer, Batch)> {
    let trainer = Trainer::from_seed(ModelConfig::tiny(), TrainConfig::default())?;
    let batch = Batch::new((0..16).collect(), (1..17).collect(), 2)?;
    Ok((trainer, batch))
}

/// Steps of the convergence check.
pub const CONVERGENCE_STEPS: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_train_config_seed_initialises_the_model() {
        let train = TrainConfig {
            seed: 7,
            ..TrainConfig::default()
        };
        let trainer = Trainer::from_seed(ModelConfig::tiny(), train).unwrap();
        let seven = Model::new(ModelConfig::tiny(), 7).unwrap();
        assert_eq!(trainer.model().params(), seven.params());
        let (default, _) = convergence_setup().unwrap();
        assert_ne!(trainer.model().params(), default.model().params());
    }

    #[test]
    fn a_diverging_step_is_refused_by_the_loss_rule() {
        let (trainer, batch) = convergence_setup().unwrap();
        let wild = TrainConfig {
            lr: 10.0,
            warmup_steps: 0,
            grad_clip: 0.0,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(trainer.into_model(), wild).unwrap();
        trainer.check_weights(&batch).unwrap();
        let first = trainer.train_step(&batch).unwrap();
        assert!(
            first.ce < divergence_limit(1000),
            "a fresh model is not diverged"
        );
        // The first update at lr 10 blew the model up: the weights it saved
        // would fail the rule (charged to step 1), and step 2 is refused.
        match trainer.check_weights(&batch) {
            Err(MoeError::Diverged { step: 1, ce, limit }) => assert!(ce > limit && ce.is_finite()),
            other => panic!("{other:?}"),
        }
        let before = trainer.clone();
        match trainer.train_step(&batch) {
            Err(MoeError::Diverged { step: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(trainer.step(), 1);
        assert_eq!(trainer.model().params(), before.model().params());
        assert_eq!(trainer.optimizer(), before.optimizer());
    }

    #[test]
    fn a_non_finite_gradient_refuses_the_step_and_leaves_everything_untouched() {
        let (mut trainer, batch) = convergence_setup().unwrap();
        trainer.train_step(&batch).unwrap();
        let before = trainer.clone();
        let (losses, _) = trainer
            .model
            .loss_and_grads(&batch, 0.01, &mut trainer.grads)
            .unwrap();
        trainer.factored.clear();
        trainer.grads[123] = f32::NAN;
        let norm = crate::kernels::sum_of_squares(&trainer.grads).sqrt() as f32;
        assert!(norm.is_nan());
        match trainer.apply_gradients(losses, norm) {
            Err(MoeError::NonFinite {
                what: "gradient",
                step: 2,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(trainer.step(), 1);
        assert_eq!(trainer.model().params(), before.model().params());
        assert_eq!(trainer.optimizer(), before.optimizer());
    }
}
