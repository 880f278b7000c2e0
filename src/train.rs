//! One training step: forward → loss → backward → clip → AdamW (CONTRACT §6).

use crate::batch::Batch;
use crate::config::{ModelConfig, TrainConfig};
use crate::error::{MoeError, Result};
use crate::model::{Losses, Model};
use crate::optim::{self, AdamW};

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
    grads: Vec<f32>,
    optimizer: AdamW,
    step: u64,
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
            grads: vec![0.0; n],
            model,
            config,
            optimizer,
            step,
        })
    }

    /// One step on `batch`. A non-finite loss or gradient, or an update that
    /// would make a weight or moment non-finite, refuses the step with
    /// [`MoeError::NonFinite`]: weights, moments and the step counter stay as
    /// they were.
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepStats> {
        let t = self.step + 1;
        let alpha = self.config.aux_loss_alpha as f32;
        let (losses, grad_norm) = self
            .model
            .loss_and_grads(batch, alpha, &mut self.grads)
            .map_err(|e| match e {
                MoeError::NonFiniteValue { what } => MoeError::NonFinite { what, step: t },
                other => other,
            })?;
        self.apply_gradients(losses, grad_norm)
    }

    /// Clips the gradients in `self.grads` (whose global norm is `grad_norm`)
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
        self.optimizer
            .update(
                self.model.params_mut(),
                &self.grads,
                scale,
                lr,
                t,
                &self.config,
            )
            .map_err(|what| MoeError::NonFinite { what, step: t })?;
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

    /// Gradients of the last step, before clipping (flat, parameter layout).
    pub fn grads(&self) -> &[f32] {
        &self.grads
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
    fn a_non_finite_gradient_refuses_the_step_and_leaves_everything_untouched() {
        let (mut trainer, batch) = convergence_setup().unwrap();
        trainer.train_step(&batch).unwrap();
        let before = trainer.clone();
        let (losses, _) = trainer
            .model
            .loss_and_grads(&batch, 0.01, &mut trainer.grads)
            .unwrap();
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
