//! An expert's forward y = x·Wᵀ on few tokens, at the tiny model's shapes,
//! by the two kernels that can compute it, with W hot, in L3 (one of 4 MB
//! of copies) or in DRAM (one of 256 MB): the weight-rows tile on W as
//! stored, and the B-in-place tile on a transposed copy Wᵀ [in, out]
//! (what a training forward would read if it kept such a copy; here the
//! copy holds W's own values read as [in, out], which times the same). Beside
//! them, a plain sequential read of the same W (Σ w²).
//!
//!     MOE_SIMD=LEVEL taskset -c 1 cargo run --release --example forward_residency

#[path = "common/mod.rs"]
mod common;

use common::median_per_call;
use rosetta_moe::kernels::{Mat, MatMut, Write, matmul, sum_of_squares};

fn main() {
    println!(
        "# cargo run --release --example forward_residency — {} at SIMD {}; one core; medians of 9 sweeps",
        rosetta_moe::kernels::cpu_model(),
        rosetta_moe::kernels::simd_level()
    );
    let mut sink = 0.0;
    for &(t, out, inp) in &[(8, 512, 64), (16, 512, 64), (8, 64, 256)] {
        let size = out * inp;
        let x: Vec<f32> = (0..t * inp).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0.0; t * out];
        for (place, bytes) in [("hot", 0usize), ("L3", 4 << 20), ("DRAM", 256 << 20)] {
            let copies = (bytes / (4 * size)).max(1);
            let w: Vec<f32> = (0..copies * size).map(|i| (i % 7) as f32 * 0.1).collect();
            let wt = w.clone();
            let rows = median_per_call(9, copies, |c| {
                let (y, x) = (MatMut::new(&mut y, t, out), Mat::new(&x, t, inp));
                matmul(
                    y,
                    x,
                    Mat::new(&w[c * size..(c + 1) * size], out, inp).t(),
                    Write::Overwrite,
                )
            });
            let in_place = median_per_call(9, copies, |c| {
                let (y, x) = (MatMut::new(&mut y, t, out), Mat::new(&x, t, inp));
                matmul(
                    y,
                    x,
                    Mat::new(&wt[c * size..(c + 1) * size], inp, out),
                    Write::Overwrite,
                )
            });
            let read = median_per_call(9, copies, |c| {
                sink += sum_of_squares(&w[c * size..(c + 1) * size])
            });
            let gbs = |s: f64| 4.0 * size as f64 / s / 1e9;
            println!(
                "T {t:2} · W [{out:3}, {inp:3}] {place:4}: weight rows {:6.2} µs ({:4.1} GB/s of W) · B in place on Wᵀ {:6.2} µs ({:4.1} GB/s) · sequential read {:5.2} µs ({:4.1} GB/s)",
                rows * 1e6,
                gbs(rows),
                in_place * 1e6,
                gbs(in_place),
                read * 1e6,
                gbs(read),
            );
        }
    }
    assert!(sink.is_finite());
}
