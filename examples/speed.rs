use rosetta_moe::*;
use std::time::Instant;
fn median(mut v: Vec<f64>) -> f64 { v.sort_by(f64::total_cmp); v[v.len()/2] }
fn main() {
    for (name, config) in [("tiny", ModelConfig::tiny()), ("small", ModelConfig::small())] {
        let ids: Vec<u32> = (0..64).map(|i| i % 1000).collect();
        let mut model = Model::new(config.clone(), 42).unwrap();
        for _ in 0..10 { model.forward(&ids, 2).unwrap(); }
        let n = if name == "tiny" { 200 } else { 20 };
        let fwd = median((0..15).map(|_| { let t = Instant::now(); for _ in 0..n { model.forward(&ids, 2).unwrap(); } t.elapsed().as_secs_f64() / n as f64 }).collect());
        let batch = Batch::new((0..16).collect(), (1..17).collect(), 2).unwrap();
        let mut tr = Trainer::new(model, TrainConfig::default()).unwrap();
        for _ in 0..10 { tr.train_step(&batch).unwrap(); }
        let st = median((0..15).map(|_| { let t = Instant::now(); for _ in 0..n { tr.train_step(&batch).unwrap(); } t.elapsed().as_secs_f64() / n as f64 }).collect());
        println!("{name}: forward B2 S32 {:.3} ms, train B2 S8 {:.3} ms, ratio {:.2}", fwd * 1e3, st * 1e3, st / fwd);
    }
}
