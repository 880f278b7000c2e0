//! How fast this core can go: a fused-multiply-add throughput probe, and
//! the rate of the square-root/divide unit.
//!
//! The benchmark reports every GFLOP/s figure as a percentage of this
//! measured peak rather than of a datasheet number. The probe runs twelve
//! independent chains of 16-lane FMAs (enough to hide the FMA latency) and
//! counts 2 FLOPs per lane per FMA. AdamW needs one square root and one
//! division per parameter, which a separate, slower unit computes:
//! [`sqrt_div_seconds`] times that pair alone, the floor of an AdamW pass
//! whose data is in cache.

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

/// Seconds per 16-lane square root plus 16-lane division (1 lane each
/// without AVX-512), issued on eight independent chains x ← 1/√x so that
/// their latency is hidden and only the unit's throughput counts; the best
/// of the runs in about `budget`.
pub fn sqrt_div_seconds(budget: Duration) -> f64 {
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let rounds = 1_000_000;
    while start.elapsed() < budget || best.is_infinite() {
        let t = Instant::now();
        std::hint::black_box(sqrt_div_chains(rounds));
        best = best.min(t.elapsed().as_secs_f64() / (rounds * 8) as f64);
    }
    best
}

/// Runs `rounds` × 8 (square root, division) pairs; returns a value to keep.
fn sqrt_div_chains(rounds: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { sqrt_div_avx512(rounds) };
    }
    let mut x = [4.0f32; 8];
    for _ in 0..rounds {
        for v in &mut x {
            *v = 1.0 / v.sqrt();
        }
    }
    x.iter().sum()
}

/// Eight independent 16-lane chains x ← 1/√x from 4 (x stays near 1: no
/// subnormals, no infinities).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sqrt_div_avx512(rounds: usize) -> f32 {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    let mut x = [_mm512_set1_ps(4.0); 8];
    for _ in 0..rounds {
        for v in &mut x {
            *v = _mm512_div_ps(one, _mm512_sqrt_ps(*v));
        }
    }
    _mm512_reduce_add_ps(
        x.into_iter()
            .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, v)),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_divider_probe_computes_its_chains() {
        // One round of x ← 1/√x from 4 leaves ½ in every lane of 8 chains
        // of 16 lanes (of 1 without AVX-512); many rounds converge to 1.
        let sum = sqrt_div_chains(1);
        assert!(sum == 64.0 || sum == 4.0, "{sum}");
        let sum = sqrt_div_chains(200);
        assert!(sum == 128.0 || sum == 8.0, "{sum}");
        assert!(sqrt_div_seconds(Duration::ZERO) > 0.0);
    }
}
