use rosetta_moe::*;
fn main() {
    let mode = std::env::args().nth(1).unwrap();
    let config = if std::env::args().nth(2).as_deref() == Some("small") { ModelConfig::small() } else { ModelConfig::tiny() };
    let ids: Vec<u32> = (0..64).map(|i| i % 1000).collect();
    let mut model = Model::new(config, 42).unwrap();
    if mode == "fwd" {
        for _ in 0..3000 { model.forward(&ids, 2).unwrap(); }
    } else {
        let batch = Batch::new((0..16).collect(), (1..17).collect(), 2).unwrap();
        let mut tr = Trainer::new(model, TrainConfig::default()).unwrap();
        for _ in 0..3000 { tr.train_step(&batch).unwrap(); }
    }
}
