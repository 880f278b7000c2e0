//! The vocabulary in plain Rust: a vector is 16 `f32`s, each operation a loop
//! over them. Runs on any CPU, and states in the simplest form what every
//! other level computes lane by lane.

use super::{Simd, array_of};

/// The scalar level (every CPU has it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scalar;

type V = [f32; 16];

#[inline(always)]
fn map(a: V, f: impl Fn(f32) -> f32) -> V {
    a.map(f)
}

#[inline(always)]
fn zip(a: V, b: V, f: impl Fn(f32, f32) -> f32) -> V {
    array_of(
        #[inline(always)]
        |i| f(a[i], b[i]),
    )
}

impl Simd for Scalar {
    type V = V;
    type D = [f64; 16];
    const TILE_ROWS: usize = 4;
    const TILE_VECS: usize = 1;
    const WEIGHT_ROWS: usize = 4;
    // Off: the reference every level is compared with bit for bit keeps the
    // one-row tile, so the paired tile of AVX2 is checked against it.
    const PAIRED_WEIGHT_ROWS: bool = false;
    const FMA_CHAINS: usize = 2;
    // As AVX2 and NEON, so the emulation runs their order of passes.
    const GRAM_SIDE: usize = 2;

    #[inline(always)]
    fn zero(self) -> V {
        [0.0; 16]
    }
    #[inline(always)]
    fn zero_f64(self) -> [f64; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    fn add_squares_f64(self, acc: [f64; 16], x: V) -> [f64; 16] {
        array_of(
            #[inline(always)]
            |i| acc[i] + f64::from(x[i]) * f64::from(x[i]),
        )
    }
    #[inline(always)]
    fn lanes_f64(self, acc: [f64; 16]) -> [f64; 16] {
        acc
    }
    #[inline(always)]
    fn splat(self, x: f32) -> V {
        [x; 16]
    }
    #[inline(always)]
    fn splat_halves(self, lo: f32, hi: f32) -> V {
        array_of(|i| if i < 8 { lo } else { hi })
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> V {
        // SAFETY: the caller's contract: 16 floats readable at p.
        unsafe { p.cast::<V>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn load_first(self, p: *const f32, n: usize) -> V {
        let mut v = [0.0; 16];
        // SAFETY: the caller's contract: n ≤ 16 floats readable at p.
        v[..n].copy_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
        v
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: V) {
        // SAFETY: the caller's contract: 16 floats writable at p.
        unsafe { p.cast::<V>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize, v: V) {
        // SAFETY: the caller's contract: n ≤ 16 floats writable at p.
        unsafe { std::slice::from_raw_parts_mut(p, n) }.copy_from_slice(&v[..n]);
    }
    #[inline(always)]
    fn add(self, a: V, b: V) -> V {
        zip(
            a,
            b,
            #[inline(always)]
            |x, y| x + y,
        )
    }
    #[inline(always)]
    fn sub(self, a: V, b: V) -> V {
        zip(
            a,
            b,
            #[inline(always)]
            |x, y| x - y,
        )
    }
    #[inline(always)]
    fn mul(self, a: V, b: V) -> V {
        zip(
            a,
            b,
            #[inline(always)]
            |x, y| x * y,
        )
    }
    #[inline(always)]
    fn div(self, a: V, b: V) -> V {
        zip(
            a,
            b,
            #[inline(always)]
            |x, y| x / y,
        )
    }
    #[inline(always)]
    fn sqrt(self, a: V) -> V {
        map(a, f32::sqrt)
    }
    #[inline(always)]
    fn mul_add(self, a: V, b: V, c: V) -> V {
        array_of(
            #[inline(always)]
            |i| a[i].mul_add(b[i], c[i]),
        )
    }
    #[inline(always)]
    fn neg_mul_add(self, a: V, b: V, c: V) -> V {
        array_of(
            #[inline(always)]
            |i| (-a[i]).mul_add(b[i], c[i]),
        )
    }
    #[inline(always)]
    fn max(self, a: V, b: V) -> V {
        zip(a, b, f32::max)
    }
    #[inline(always)]
    fn min(self, a: V, b: V) -> V {
        zip(a, b, f32::min)
    }
    #[inline(always)]
    fn round(self, a: V) -> V {
        map(a, f32::round_ties_even)
    }
    #[inline(always)]
    fn exp2i(self, n: V) -> V {
        map(
            n,
            #[inline(always)]
            |n| f32::from_bits(((n as i32 + 127) as u32) << 23),
        )
    }
    #[inline(always)]
    fn reduce_add(self, v: V) -> f32 {
        let s8: [f32; 8] = array_of(
            #[inline(always)]
            |i| v[i] + v[i + 8],
        );
        let s4: [f32; 4] = array_of(
            #[inline(always)]
            |i| s8[i] + s8[i + 4],
        );
        let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
        s2[0] + s2[1]
    }
    #[inline(always)]
    fn reduce_max(self, v: V) -> f32 {
        v.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
    #[inline(always)]
    fn transpose(self, rows: [V; 16]) -> [V; 16] {
        array_of(
            #[inline(always)]
            |c| {
                array_of(
                    #[inline(always)]
                    |r| rows[r][c],
                )
            },
        )
    }
    #[inline(always)]
    fn prefetch(self, _p: *const f32) {}
}
