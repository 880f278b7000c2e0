//! Intra-op threads change the speed, never the numbers.

pub mod common;

use common::random_batch;
use rosetta_moe::{Model, ModelConfig, TrainConfig, Trainer, kernels};

/// Logits, losses and weights after a few training steps with `threads`.
fn run(threads: usize, dropout: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(kernels::set_threads(threads), threads);
    // Large enough that matrix multiplies and AdamW are split: 128 tokens
    // split the products by rows, 16 tokens by columns (the inference
    // forward's packed weights as well as the training step's).
    let config = ModelConfig::tiny();
    let mut model = Model::new(config.clone(), 11).unwrap();
    let tall = random_batch(&config, 4, 32, 12);
    let short = random_batch(&config, 2, 8, 13);
    let mut logits = model.forward(&tall.ids, 4).unwrap().to_vec();
    logits.extend_from_slice(model.forward(&short.ids, 2).unwrap());
    let train = TrainConfig {
        dropout,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, train).unwrap();
    let losses = [&tall, &short, &tall, &short]
        .iter()
        .map(|batch| trainer.train_step(batch).unwrap().loss)
        .collect();
    (logits, losses, trainer.model().params().to_vec())
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn two_and_three_threads_give_the_single_thread_bits() {
    for (threads, dropout) in [(2, 0.0), (3, 0.0), (2, 0.3)] {
        let one = run(1, dropout);
        let many = run(threads, dropout);
        assert!(
            same_bits(&one.0, &many.0),
            "logits differ with {threads} threads (dropout {dropout})"
        );
        assert!(
            same_bits(&one.1, &many.1),
            "losses differ with {threads} threads (dropout {dropout})"
        );
        assert!(
            same_bits(&one.2, &many.2),
            "weights differ with {threads} threads (dropout {dropout})"
        );
    }
    assert_eq!(kernels::threads(), 2);
    kernels::set_threads(1);
}
