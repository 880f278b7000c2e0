//! How fast this core can go: a fused-multiply-add throughput probe, and
//! the rate of the square-root/divide unit.
//!
//! The benchmark reports every GFLOP/s figure as a percentage of this
//! measured peak rather than of a datasheet number. The probe runs
//! independent chains of 16-lane FMAs at the level the kernels run at (12
//! on AVX-512, 6 — twelve ymm or 24 q registers — on AVX2 and NEON: enough to
//! hide the FMA latency) and counts 2 FLOPs per lane per FMA. AdamW needs one square root and one
//! division per parameter, which a separate, slower unit computes:
//! [`sqrt_div_seconds`] times that pair alone, the floor of an AdamW pass
//! whose data is in cache.

use std::time::{Duration, Instant};

use super::simd::{self, Simd, simd_call};

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

/// Seconds per 16-lane square root plus 16-lane division (at the kernels'
/// level: two ymm or four q operations each below AVX-512), issued on eight independent chains x ← 1/√x so that
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

/// Runs `rounds` × 8 (square root, division) pairs at this process's SIMD
/// level; returns a value to keep.
fn sqrt_div_chains(rounds: usize) -> f32 {
    simd_call!(simd::active(), sqrt_div_on(rounds))
}

/// Eight independent 16-lane chains x ← 1/√x from 4 (x stays near 1: no
/// subnormals, no infinities); the sum of every lane.
#[inline(always)]
fn sqrt_div_on<S: Simd>(s: S, rounds: usize) -> f32 {
    let one = s.splat(1.0);
    let mut x = [s.splat(4.0); 8];
    for _ in 0..rounds {
        for v in &mut x {
            *v = s.div(one, s.sqrt(*v));
        }
    }
    sum_of(s, &x)
}

/// Runs `rounds` × [`Simd::FMA_CHAINS`] 16-lane FMAs at this process's SIMD
/// level; returns (FLOPs done, a value to keep).
fn chains(rounds: usize) -> (f64, f32) {
    simd_call!(simd::active(), chains_on(rounds))
}

#[inline(always)]
fn chains_on<S: Simd>(s: S, rounds: usize) -> (f64, f32) {
    let sink = match S::FMA_CHAINS {
        12 => fma_chains::<S, 12>(s, rounds),
        6 => fma_chains::<S, 6>(s, rounds),
        _ => fma_chains::<S, 2>(s, rounds),
    };
    ((rounds * S::FMA_CHAINS * 16 * 2) as f64, sink)
}

/// N independent chains v ← v·a + b of 16 lanes each: enough of them to
/// hide the multiply-add latency, few enough to stay in registers.
#[inline(always)]
fn fma_chains<S: Simd, const N: usize>(s: S, rounds: usize) -> f32 {
    let mut acc = [s.zero(); N];
    let (a, b) = (s.splat(1.000_000_1), s.splat(1e-7));
    for _ in 0..rounds {
        for v in &mut acc {
            *v = s.mul_add(*v, a, b);
        }
    }
    sum_of(s, &acc)
}

/// Σ of every lane of every vector (a value the optimiser cannot drop).
#[inline(always)]
fn sum_of<S: Simd>(s: S, vectors: &[S::V]) -> f32 {
    let mut sum = s.zero();
    for &v in vectors {
        sum = s.add(sum, v);
    }
    s.reduce_add(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_divider_probe_computes_its_chains() {
        // One round of x ← 1/√x from 4 leaves ½ in every lane of 8 chains
        // of 16 lanes; many rounds converge to 1.
        assert_eq!(sqrt_div_chains(1), 64.0);
        assert_eq!(sqrt_div_chains(200), 128.0);
        assert!(sqrt_div_seconds(Duration::ZERO) > 0.0);
    }
}
