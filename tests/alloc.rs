//! After the first call with a given shape, forward and train_step allocate nothing.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::random_batch;
use rosetta_moe::{Model, ModelConfig, TrainConfig, Trainer};

/// Counts every allocation made through the global allocator.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    f();
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

// One test function, so no other test thread allocates while we count.
#[test]
fn steady_state_forward_and_train_step_do_not_allocate() {
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

#[test]
fn the_counter_sees_allocations() {
    let n = allocations_during(|| {
        let v: Vec<u8> = Vec::with_capacity(100);
        std::hint::black_box(v);
    });
    assert!(n >= 1);
}
