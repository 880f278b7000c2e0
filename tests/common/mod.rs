//! Helpers shared by the integration tests.
#![allow(dead_code)]

use rosetta_moe::{Batch, ModelConfig};

/// A small deterministic generator, so test inputs do not depend on `rand`.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
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
