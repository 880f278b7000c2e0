//! # rosetta-moe
//!
//! A Mixture-of-Experts Transformer written from first principles: forward
//! pass, hand-derived exact backward pass, AdamW, checkpoints and sampling,
//! every equation visible as code. The contract it implements is
//! `CONTRACT.md` (shapes, formulas, defaults).
//!
//! ```no_run
//! use rosetta_moe::{Batch, Model, ModelConfig, TrainConfig, Trainer};
//!
//! let model = Model::new(ModelConfig::tiny(), 42)?;
//! let mut trainer = Trainer::new(model, TrainConfig::default())?;
//! let batch = Batch::new((0..16).collect(), (1..17).collect(), 2)?;
//! let stats = trainer.train_step(&batch)?;
//! println!("loss {} lr {}", stats.loss, stats.lr);
//! # Ok::<(), rosetta_moe::MoeError>(())
//! ```
//!
//! Modules, in the order data flows through them: [`kernels`] (matrix
//! multiply and vector primitives) → [`layers`], [`attention`], [`moe`] →
//! [`model`] (with [`batch`]) → [`loss`], [`optim`] → [`train`] → [`checkpoint`].

#![deny(missing_docs)]

pub mod atomic_write;
pub mod attention;
pub mod batch;
pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dropout;
pub mod error;
pub mod eval;
pub mod hf;
pub mod kernels;
pub mod layers;
pub mod loss;
pub mod memory;
pub mod model;
pub mod moe;
pub mod optim;
pub mod params;
pub mod sampling;
pub mod stability;
pub mod tokenizer;
pub mod train;

pub use attention::KvCache;
pub use batch::Batch;
pub use config::{ModelConfig, TrainConfig};
pub use error::{MoeError, Result};
pub use model::{Losses, Model};
pub use params::ParamLayout;
pub use sampling::SamplingStrategy;
pub use tokenizer::Tokenizer;
pub use train::{StepStats, Trainer};
