//! Where a preset's training step (B 2 × S 8, one core; the small model
//! unless a preset is named) spends its time, phase by phase, and what the
//! AdamW pass does to the products that follow it:
//!
//!   step                     Trainer::train_step (forward, backward, AdamW)
//!   forward + backward, cold after a pass that streams p, g, m, v of the
//!                            model's size through the caches, as AdamW does
//!   forward + backward, warm the same, back to back (the weights partly cached)
//!   forward, cold / warm     Model::losses alone, likewise
//!
//!     cargo run --release --example step_phases > docs/perf/step-phases.txt
//!     cargo run --release --example step_phases tiny

use std::time::Instant;

use rosetta_moe::batch::Batch;
use rosetta_moe::config::{ModelConfig, TrainConfig};
use rosetta_moe::kernels::{self, AdamWStep};
use rosetta_moe::params::OuterGrads;
use rosetta_moe::train::Trainer;

/// Median of `n` timings of `run`, each after `before` (untimed).
fn median_ms(n: usize, mut before: impl FnMut(), mut run: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            before();
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[n / 2]
}

fn main() -> rosetta_moe::error::Result<()> {
    let preset = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "small".to_string());
    let config = ModelConfig::preset(&preset)?;
    let mut trainer = Trainer::from_seed(config.clone(), TrainConfig::default())?;
    let (batch, seq) = (2, 8);
    let vocab = config.vocab_size as u32;
    let ids: Vec<u32> = (0..batch * seq).map(|i| i as u32 % vocab).collect();
    let targets = ids.iter().map(|i| (i + 1) % vocab).collect();
    let batch = Batch::new(ids, targets, batch)?;
    for _ in 0..5 {
        trainer.train_step(&batch)?;
    }
    let n = config.param_count();
    // A stand-in for AdamW's traffic: the same kernel over buffers of the model's size.
    let (mut p, g, mut m, mut v) = (
        kernels::zeroed(n),
        kernels::zeroed(n),
        kernels::zeroed(n),
        kernels::zeroed(n),
    );
    let step = AdamWStep::new((0.9, 0.95), 1e-8, 1e-3, 1);
    let mut stream = || kernels::adamw(&mut p, &g, &mut m, &mut v, step);
    let mut grads = kernels::zeroed(n);
    let mut factored = OuterGrads::default();
    let bound = OuterGrads::bound(trainer.model().layout(), batch.tokens(), config.top_k);
    factored.reserve(bound, trainer.model().layout().tensors.len());
    let rounds = 60;
    let mut results = Vec::new();
    for _ in 0..3 {
        let step_ms = median_ms(
            rounds,
            || {},
            || {
                trainer.train_step(&batch).expect("a finite step");
            },
        );
        let stream_ms = median_ms(rounds, || {}, &mut stream);
        let model = trainer.model_mut();
        let mut fwd_bwd = || {
            factored.clear();
            model
                .loss_and_factored_grads(&batch, 0.01, &mut grads, &mut factored)
                .expect("a finite step");
        };
        let cold = median_ms(rounds, &mut stream, &mut fwd_bwd);
        let warm = median_ms(rounds, || {}, &mut fwd_bwd);
        let mut forward = || {
            model.losses(&batch, 0.01).expect("a finite loss");
        };
        let forward_cold = median_ms(rounds, &mut stream, &mut forward);
        let forward_warm = median_ms(rounds, || {}, &mut forward);
        results.push([step_ms, stream_ms, cold, warm, forward_cold, forward_warm]);
    }
    println!(
        "# cargo run --release --example step_phases {preset} ({preset} model, B 2 × S 8, one core;\n\
         # {} at SIMD {}; medians of {rounds} runs each, three rounds; ms)",
        kernels::cpu_model(),
        kernels::simd_level()
    );
    println!("round  step  adamw-shaped-pass  fwd+bwd-cold  fwd+bwd-warm  fwd-cold  fwd-warm");
    for (i, r) in results.iter().enumerate() {
        println!(
            "{:5} {:6.3} {:18.3} {:13.3} {:13.3} {:9.3} {:9.3}",
            i + 1,
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5]
        );
    }
    Ok(())
}
