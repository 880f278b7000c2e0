//! How fast this core can go: a fused-multiply-add throughput probe.
//!
//! The benchmark reports every GFLOP/s figure as a percentage of this
//! measured peak rather than of a datasheet number. The probe runs twelve
//! independent chains of 16-lane FMAs (enough to hide the FMA latency) and
//! counts 2 FLOPs per lane per FMA.

use std::time::{Duration, Instant};

/// Measured single-thread FMA throughput in GFLOP/s, running for about `budget`.
pub fn fma_peak_gflops(budget: Duration) -> f64 {
    let mut best = 0.0f64;
    let start = Instant::now();
    let rounds = 2_000_000;
    while start.elapsed() < budget || best == 0.0 {
        let t = Instant::now();
        let (flops, sink) = chains(rounds);
        std::hint::black_box(sink);
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Runs `rounds` × 12 vector FMAs; returns (FLOPs done, a value to keep).
fn chains(rounds: usize) -> (f64, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        let sink = unsafe { chains_avx512(rounds) };
        return ((rounds * 12 * 16 * 2) as f64, sink);
    }
    let mut acc = [0.0f32; 12];
    for _ in 0..rounds {
        for a in &mut acc {
            *a = a.mul_add(1.000_000_1, 1e-7);
        }
    }
    ((rounds * 12 * 2) as f64, acc.iter().sum())
}

/// Twelve independent 16-lane FMA chains.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains_avx512(rounds: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 12];
    let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-7));
    for _ in 0..rounds {
        for v in &mut acc {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for v in acc {
        sum = _mm512_add_ps(sum, v);
    }
    _mm512_reduce_add_ps(sum)
}
