//! The vocabulary on aarch64 Advanced SIMD (NEON): a vector is four q
//! registers, lanes 0..4, 4..8, 8..12 and 12..16.

use std::arch::aarch64::*;

use super::{Simd, array_of};

/// Proof that this CPU has Advanced SIMD (every aarch64 CPU that runs Linux
/// or macOS does; it is checked all the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Neon(());

impl Neon {
    /// The token, if this CPU has NEON.
    pub(crate) fn detect() -> Option<Self> {
        std::arch::is_aarch64_feature_detected!("neon").then_some(Neon(()))
    }

    /// Runs `f` compiled for NEON, so the intrinsics it calls inline.
    #[inline(always)]
    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        #[target_feature(enable = "neon")]
        fn with_neon<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the token exists only when the CPU has NEON.
        unsafe { with_neon(f) }
    }
}

type V = [float32x4_t; 4];

#[inline(always)]
fn each(a: V, f: impl Fn(float32x4_t) -> float32x4_t) -> V {
    a.map(f)
}

#[inline(always)]
fn pairs(a: V, b: V, f: impl Fn(float32x4_t, float32x4_t) -> float32x4_t) -> V {
    array_of(
        #[inline(always)]
        |i| f(a[i], b[i]),
    )
}

// SAFETY (every `unsafe` block below without its own note): a value of
// `Neon` exists only when the CPU has NEON (`detect`), so the intrinsics can
// run; pointer contracts are the callers', as the trait states.
impl Simd for Neon {
    type V = V;
    type D = [float64x2_t; 8];
    const TILE_ROWS: usize = 6;
    const TILE_VECS: usize = 1;
    const WEIGHT_ROWS: usize = 4;
    // Not yet timed on an ARM CPU (only run under emulation): kept off.
    const PAIRED_WEIGHT_ROWS: bool = false;
    const FMA_CHAINS: usize = 6;
    // 16 sums would be 64 q registers: four 2 × 2 passes (16 q each).
    const GRAM_SIDE: usize = 2;

    #[inline(always)]
    fn zero(self) -> V {
        unsafe { [vdupq_n_f32(0.0); 4] }
    }
    #[inline(always)]
    fn zero_f64(self) -> [float64x2_t; 8] {
        unsafe { [vdupq_n_f64(0.0); 8] }
    }
    #[inline(always)]
    fn add_squares_f64(self, acc: [float64x2_t; 8], x: V) -> [float64x2_t; 8] {
        array_of(
            #[inline(always)]
            |i| unsafe {
                let w = if i % 2 == 0 {
                    vcvt_f64_f32(vget_low_f32(x[i / 2]))
                } else {
                    vcvt_high_f64_f32(x[i / 2])
                };
                vfmaq_f64(acc[i], w, w)
            },
        )
    }
    #[inline(always)]
    fn lanes_f64(self, acc: [float64x2_t; 8]) -> [f64; 16] {
        let mut out = [0.0; 16];
        for (i, &a) in acc.iter().enumerate() {
            // SAFETY: out has room for the 8 × 2 doubles stored.
            unsafe { vst1q_f64(out.as_mut_ptr().add(2 * i), a) }
        }
        out
    }
    #[inline(always)]
    fn splat(self, x: f32) -> V {
        unsafe { [vdupq_n_f32(x); 4] }
    }
    #[inline(always)]
    fn splat_halves(self, lo: f32, hi: f32) -> V {
        unsafe {
            [
                vdupq_n_f32(lo),
                vdupq_n_f32(lo),
                vdupq_n_f32(hi),
                vdupq_n_f32(hi),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> V {
        unsafe {
            array_of(
                #[inline(always)]
                |i| vld1q_f32(p.add(4 * i)),
            )
        }
    }
    #[inline(always)]
    unsafe fn load_first(self, p: *const f32, n: usize) -> V {
        let mut buf = [0.0f32; 16];
        // SAFETY: the caller's contract: n ≤ 16 floats readable at p.
        buf[..n].copy_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
        unsafe { self.load(buf.as_ptr()) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: V) {
        for (i, q) in v.into_iter().enumerate() {
            unsafe { vst1q_f32(p.add(4 * i), q) }
        }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize, v: V) {
        let mut buf = [0.0f32; 16];
        unsafe { self.store(buf.as_mut_ptr(), v) };
        // SAFETY: the caller's contract: n ≤ 16 floats writable at p.
        unsafe { std::slice::from_raw_parts_mut(p, n) }.copy_from_slice(&buf[..n]);
    }
    #[inline(always)]
    fn add(self, a: V, b: V) -> V {
        pairs(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { vaddq_f32(x, y) },
        )
    }
    #[inline(always)]
    fn sub(self, a: V, b: V) -> V {
        pairs(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { vsubq_f32(x, y) },
        )
    }
    #[inline(always)]
    fn mul(self, a: V, b: V) -> V {
        pairs(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { vmulq_f32(x, y) },
        )
    }
    #[inline(always)]
    fn div(self, a: V, b: V) -> V {
        pairs(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { vdivq_f32(x, y) },
        )
    }
    #[inline(always)]
    fn sqrt(self, a: V) -> V {
        each(
            a,
            #[inline(always)]
            |x| unsafe { vsqrtq_f32(x) },
        )
    }
    #[inline(always)]
    fn mul_add(self, a: V, b: V, c: V) -> V {
        array_of(
            #[inline(always)]
            |i| unsafe { vfmaq_f32(c[i], a[i], b[i]) },
        )
    }
    #[inline(always)]
    fn neg_mul_add(self, a: V, b: V, c: V) -> V {
        array_of(
            #[inline(always)]
            |i| unsafe { vfmsq_f32(c[i], a[i], b[i]) },
        )
    }
    #[inline(always)]
    fn max(self, a: V, b: V) -> V {
        // maxNum: a NaN lane gives the other operand, as x86's max does for
        // the clamps the kernels use.
        pairs(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { vmaxnmq_f32(x, y) },
        )
    }
    #[inline(always)]
    fn min(self, a: V, b: V) -> V {
        pairs(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { vminnmq_f32(x, y) },
        )
    }
    #[inline(always)]
    fn round(self, a: V) -> V {
        each(
            a,
            #[inline(always)]
            |x| unsafe { vrndnq_f32(x) },
        )
    }
    #[inline(always)]
    fn exp2i(self, n: V) -> V {
        each(
            n,
            #[inline(always)]
            |n| unsafe {
                let biased = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
                vreinterpretq_f32_s32(vshlq_n_s32::<23>(biased))
            },
        )
    }
    #[inline(always)]
    fn reduce_add(self, v: V) -> f32 {
        unsafe {
            // s8 = (v_i + v_(i+8)) in two q; s4 = s8_i + s8_(i+4) in one.
            let s4 = vaddq_f32(vaddq_f32(v[0], v[2]), vaddq_f32(v[1], v[3]));
            let s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
            vget_lane_f32::<0>(s2) + vget_lane_f32::<1>(s2)
        }
    }
    #[inline(always)]
    fn reduce_max(self, v: V) -> f32 {
        unsafe {
            vmaxnmvq_f32(vmaxnmq_f32(
                vmaxnmq_f32(v[0], v[1]),
                vmaxnmq_f32(v[2], v[3]),
            ))
        }
    }
    #[inline(always)]
    fn transpose(self, rows: [V; 16]) -> [V; 16] {
        // Sixteen 4 × 4 blocks: block (R, C) of the output is the transpose of
        // block (C, R) of the input; rows[r][q] holds row r, columns 4q..4q+4.
        let mut out = rows;
        for rb in 0..4 {
            for cb in 0..4 {
                // SAFETY: the token proves NEON.
                let t = unsafe {
                    transpose4(array_of(
                        #[inline(always)]
                        |i| rows[4 * rb + i][cb],
                    ))
                };
                for (i, q) in t.into_iter().enumerate() {
                    out[4 * cb + i][rb] = q;
                }
            }
        }
        out
    }
    #[inline(always)]
    fn prefetch(self, p: *const f32) {
        // SAFETY: PRFM is a hint: it never faults and writes nothing.
        unsafe {
            std::arch::asm!("prfm pldl2keep, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags))
        }
    }
}

/// Transposes a 4 × 4 block: out[c] lane r = r_in[r] lane c.
#[inline(always)]
unsafe fn transpose4(r: [float32x4_t; 4]) -> [float32x4_t; 4] {
    // SAFETY: the caller holds a Neon token.
    unsafe {
        // (r0c0 r1c0 r0c2 r1c2), (r0c1 r1c1 r0c3 r1c3), likewise rows 2, 3.
        let (a0, a1) = (vtrn1q_f32(r[0], r[1]), vtrn2q_f32(r[0], r[1]));
        let (b0, b1) = (vtrn1q_f32(r[2], r[3]), vtrn2q_f32(r[2], r[3]));
        let d = |x: float32x4_t| vreinterpretq_f64_f32(x);
        let f = |x: float64x2_t| vreinterpretq_f32_f64(x);
        [
            f(vtrn1q_f64(d(a0), d(b0))),
            f(vtrn1q_f64(d(a1), d(b1))),
            f(vtrn2q_f64(d(a0), d(b0))),
            f(vtrn2q_f64(d(a1), d(b1))),
        ]
    }
}
