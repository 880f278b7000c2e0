//! Paired timing inside one process: the same training step (or forward)
//! from two versions of the crate, `old` and `new`, alternated call by call
//! (ABBA order), so both see the same machine. On a shared virtual machine
//! whose speed changes every few hundred milliseconds, two runs of
//! `moe bench` even seconds apart (`bench/ab.py`) can differ by 1.5×;
//! pairs of calls a few milliseconds apart do not.
//!
//! Built and run by `bench/pair/run` (see there).

use std::time::{Duration, Instant};

/// A closure running one training step (or, with `forward`, one forward)
/// of `config` on a fixed batch, built from crate `$k`.
macro_rules! step {
    ($k:ident, $config:expr, $batch:expr, $seq:expr, $forward:expr) => {{
        use $k::batch::Batch;
        use $k::config::{ModelConfig, TrainConfig};
        let config = ModelConfig::preset($config).expect("a preset name");
        let mut trainer = $k::train::Trainer::from_seed(config, TrainConfig::default())
            .expect("a model");
        let ids: Vec<u32> = (0..$batch * $seq).map(|i| ((i * 7) % 1000) as u32).collect();
        let targets = ids.iter().map(|i| (i + 1) % 1000).collect();
        let batch = Batch::new(ids, targets, $batch).expect("a batch");
        move || {
            if $forward {
                let ids = &batch.ids;
                trainer.model_mut().forward(ids, batch.batch_size).expect("logits");
            } else {
                trainer.train_step(&batch).expect("a finite step");
            }
        }
    }};
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: CONFIG BATCH SEQ THREADS PAIRS [forward|train]";
    let [config, batch, seq, threads, pairs, rest @ ..] = args.as_slice() else {
        panic!("{usage}");
    };
    let number = |s: &str| s.parse::<usize>().expect(usage);
    let (batch, seq, threads, pairs) = (number(batch), number(seq), number(threads), number(pairs));
    let forward = rest.first().is_some_and(|w| w == "forward");
    old::kernels::set_threads(threads);
    new::kernels::set_threads(threads);
    let mut runs: [Box<dyn FnMut()>; 2] = [
        Box::new(step!(old, config, batch, seq, forward)),
        Box::new(step!(new, config, batch, seq, forward)),
    ];
    for _ in 0..3 {
        runs.iter_mut().for_each(|run| run());
    }
    let mut ms = [Vec::new(), Vec::new()];
    for i in 0..pairs {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            if threads > 1 {
                // The other version's helper spins for 2 ms after its last piece.
                std::thread::sleep(Duration::from_millis(5));
            }
            let start = Instant::now();
            runs[which]();
            ms[which].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut ratios: Vec<f64> = ms[0].iter().zip(&ms[1]).map(|(o, n)| n / o).collect();
    let sorted = |v: &mut Vec<f64>| v.sort_by(f64::total_cmp);
    ms.iter_mut().for_each(sorted);
    sorted(&mut ratios);
    let at = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let what = if forward { "forward" } else { "train step" };
    println!("{config} B {batch} × S {seq}, {what}, {threads} thread(s), {pairs} pairs");
    println!("| | fastest | 10th pct | median |");
    println!("|---|---|---|---|");
    for (name, v) in ["old", "new"].iter().zip(&ms) {
        println!("| {name} (ms) | {:.3} | {:.3} | {:.3} |", v[0], at(v, 0.1), at(v, 0.5));
    }
    let (o, n) = (&ms[0], &ms[1]);
    println!(
        "| new ÷ old | {:.3} | {:.3} | {:.3} |",
        n[0] / o[0],
        at(n, 0.1) / at(o, 0.1),
        at(n, 0.5) / at(o, 0.5)
    );
    println!(
        "median of the {pairs} pairs' own ratios (new ÷ old): {:.3}",
        at(&ratios, 0.5)
    );
}
