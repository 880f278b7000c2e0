//! How fast the training step's two weight-reading products move a weight
//! that is not in cache: x·Wᵀ (forward) and dy·W (dX) on the small model's
//! expert shapes, each over 256 MB of distinct weights ("cold") and over one
//! weight again and again ("hot"), beside a plain sequential read of the same
//! buffers (Σ w², the AdamW-like streaming rate for this access order).
//!
//!     cargo run --release --example cold_weights > docs/perf/cold-weights.txt

#[path = "common/mod.rs"]
mod common;

use common::median_per_call;
use rosetta_moe::kernels::{Mat, MatMut, Write, matmul, sum_of_squares};

fn main() {
    println!("# cargo run --release --example cold_weights (one core; medians of 5 sweeps)");
    let mut sink = 0.0;
    for &(t, out, inp) in &[
        (8, 2048, 256),
        (16, 2048, 256),
        (8, 256, 1024),
        (16, 256, 1024),
    ] {
        let size = out * inp;
        let copies = (256 << 20) / (4 * size);
        let weights: Vec<f32> = (0..copies * size).map(|i| (i % 7) as f32 * 0.1).collect();
        let w = |c: usize| &weights[c * size..(c + 1) * size];
        let x: Vec<f32> = (0..t * inp).map(|i| (i % 5) as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..t * out).map(|i| (i % 3) as f32 * 0.1).collect();
        let (mut y, mut dx) = (vec![0.0; t * out], vec![0.0; t * inp]);
        for (what, pick) in [("cold", 1usize), ("hot ", 0)] {
            let forward = median_per_call(5, copies, |c| {
                let (y, x) = (MatMut::new(&mut y, t, out), Mat::new(&x, t, inp));
                matmul(y, x, Mat::new(w(c * pick), out, inp).t(), Write::Overwrite)
            });
            let backward = median_per_call(5, copies, |c| {
                let (dx, dy) = (MatMut::new(&mut dx, t, inp), Mat::new(&dy, t, out));
                matmul(dx, dy, Mat::new(w(c * pick), out, inp), Write::Overwrite)
            });
            let read = median_per_call(5, copies, |c| sink += sum_of_squares(w(c * pick)));
            let gbs = |s: f64| 4.0 * size as f64 / s / 1e9;
            let gflops = |s: f64| 2.0 * (t * size) as f64 / s / 1e9;
            println!(
                "T {t:2} · W [{out:4}, {inp:4}] {what}: forward {:6.1} µs ({:5.1} GFLOP/s, {:4.1} GB/s of W) · dX {:6.1} µs ({:5.1} GFLOP/s, {:4.1} GB/s) · sequential read {:4.1} GB/s",
                forward * 1e6,
                gflops(forward),
                gbs(forward),
                backward * 1e6,
                gflops(backward),
                gbs(backward),
                gbs(read),
            );
        }
    }
    assert!(sink.is_finite());
}
