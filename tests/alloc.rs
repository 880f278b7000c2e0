//! After the first call with a given shape, forward and train_step allocate nothing.

pub mod common;

use common::random_batch;
use rosetta_moe::kernels::{CountingAllocator, allocation_count};
use rosetta_moe::{Model, ModelConfig, TrainConfig, Trainer};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = allocation_count();
    f();
    allocation_count() - before
}

// One test function: the counter is global, so a second test running on
// another thread would add its allocations to ours.
#[test]
fn steady_state_forward_and_train_step_do_not_allocate() {
    // The counter works: a zero below is not the counter being off.
    let n = allocations_during(|| {
        let v: Vec<u8> = Vec::with_capacity(100);
        std::hint::black_box(v);
    });
    assert!(n >= 1, "the counting allocator saw nothing");
    for config in [ModelConfig::tiny(), common::gqa_config()] {
        let batch = random_batch(&config, 2, 8, 1);
        let mut model = Model::new(config.clone(), 42).unwrap();
        model.forward(&batch.ids, 2).unwrap();
        let n = allocations_during(|| {
            for _ in 0..3 {
                model.forward(&batch.ids, 2).unwrap();
            }
        });
        assert_eq!(n, 0, "forward allocated {n} times");

        let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
        trainer.train_step(&batch).unwrap();
        let n = allocations_during(|| {
            for _ in 0..3 {
                trainer.train_step(&batch).unwrap();
            }
        });
        assert_eq!(n, 0, "train_step allocated {n} times");
        // Inference after training reuses the training buffers.
        let n = allocations_during(|| {
            trainer.model_mut().forward(&batch.ids, 2).unwrap();
        });
        assert_eq!(n, 0, "forward after training allocated {n} times");
    }
}
