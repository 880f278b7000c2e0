//! Helpers shared by the integration tests. Each test crate declares
//! `pub mod common;`, so a crate using only some of them does not flag the
//! others; every helper here is used by at least one test.

use rosetta_moe::{Batch, ModelConfig};

/// A small deterministic generator, so test inputs do not depend on `rand`.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A random batch of B sequences of length S for `config`.
pub fn random_batch(config: &ModelConfig, batch: usize, seq: usize, seed: u64) -> Batch {
    let mut rng = Lcg(seed);
    let v = config.vocab_size;
    let ids = (0..batch * seq).map(|_| rng.below(v) as u32).collect();
    let targets = (0..batch * seq).map(|_| rng.below(v) as u32).collect();
    Batch::new(ids, targets, batch).expect("valid shape")
}

/// The convergence batch of CONTRACT §11: ids 0..15, targets 1..16, B 2 × S 8.
pub fn convergence_batch() -> Batch {
    Batch::new((0..16).collect(), (1..17).collect(), 2).expect("valid shape")
}

/// A custom config exercising GQA (H 4, Hkv 2), NTK RoPE (α 2) and k < E.
pub fn gqa_config() -> ModelConfig {
    ModelConfig {
        n_kv_heads: 2,
        rope_alpha: 2.0,
        max_seq_len: 16,
        ..ModelConfig::tiny()
    }
}

/// The global L2 norm sqrt(Σ g²), summed in f64 in plain index order: an
/// oracle independent of the fused, per-tensor sum of `loss_and_grads`.
pub fn global_norm(grads: &[f32]) -> f32 {
    let sum: f64 = grads.iter().map(|&g| f64::from(g) * f64::from(g)).sum();
    sum.sqrt() as f32
}
