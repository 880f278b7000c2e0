//! The batch JSON of `moe dump`, then what dump does with it: losses,
//! gradients and one AdamW step on the fixture model.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rosetta_moe::{Batch, Model, TrainConfig, Trainer};

fuzz_target!(|data: &[u8]| {
    rosetta_moe_fuzz::setup();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(batch) = Batch::from_json_at(text, "batch.json".as_ref()) else {
        return;
    };
    let mut model = Model::new(rosetta_moe_fuzz::config(), 3).expect("fixture model");
    let mut grads = vec![0.0; model.layout().len];
    if model.loss_and_grads(&batch, 0.01, &mut grads).is_err() {
        return;
    }
    assert!(grads.iter().all(|g| g.is_finite()));
    let mut trainer = Trainer::new(model, TrainConfig::default()).expect("trainer");
    if let Ok(stats) = trainer.train_step(&batch) {
        assert!(stats.loss.is_finite());
    }
});
