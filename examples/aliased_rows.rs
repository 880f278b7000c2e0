//! What a weight whose rows lie 4 KB apart costs dX = dy·W on the few rows
//! of a small training step (an expert gets about 8 of 16 tokens): the same
//! product with W's rows at their natural stride and padded by 64 bytes, so
//! that consecutive rows no longer fall in the same L1 set. `down_proj` of
//! the small model (W [256, 1024]) has 4 KB rows; `gate|up` (W [2048, 256])
//! 1 KB rows, as a control.
//!
//! Each figure is the fastest of 7 timings of 2,000 calls, one thread:
//!
//!     MOE_SIMD=avx2 taskset -c 1 cargo run --release --example aliased_rows

use std::time::Instant;

use rosetta_moe::kernels::{Mat, MatMut, Write, matmul};

fn main() {
    println!(
        "# {} at {}; dX = dy [m, k] · W [k, n], W's rows `ld` floats apart",
        rosetta_moe::kernels::cpu_model(),
        rosetta_moe::kernels::simd_level(),
    );
    for (k, n, ld) in [
        (256, 1024, 1024),
        (256, 1024, 1040),
        (2048, 256, 256),
        (2048, 256, 272),
    ] {
        for m in [6, 8, 16] {
            let dy: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..k * ld).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut dx = vec![0.0f32; m * n];
            let iters = 2000;
            let best = (0..7)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        matmul(
                            MatMut::new(&mut dx, m, n),
                            Mat::new(&dy, m, k),
                            Mat::strided(&w, k, n, ld),
                            Write::Overwrite,
                        );
                    }
                    start.elapsed().as_secs_f64() / iters as f64
                })
                .fold(f64::INFINITY, f64::min);
            let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
            println!(
                "m {m:3} k {k:5} n {n:5} ld {ld:5}: {:7.2} µs {gflops:6.1} GFLOP/s",
                best * 1e6
            );
        }
    }
}
