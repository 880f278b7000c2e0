//! The vocabulary on AVX-512F: a vector is one zmm register.

use std::arch::x86_64::*;

use super::{Simd, array_of};

/// Proof that this CPU has AVX-512F (with AVX2 and FMA, which every AVX-512
/// CPU has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// The token, if this CPU has AVX-512F, AVX2 and FMA.
    pub(crate) fn detect() -> Option<Self> {
        let has = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma");
        has.then_some(Avx512(()))
    }

    /// Runs `f` compiled for AVX-512F, so the intrinsics it calls inline.
    #[inline(always)]
    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the token exists only when the CPU has these features.
        unsafe { with_avx512(f) }
    }
}

/// Lane masks of the first n lanes.
#[inline(always)]
fn first(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

// SAFETY (every `unsafe` block below without its own note): a value of
// `Avx512` exists only when the CPU has AVX-512F, AVX2 and FMA (`detect`), so
// the intrinsics can run; pointer contracts are the callers', as the trait
// states.
impl Simd for Avx512 {
    type V = __m512;
    type D = [__m512d; 2];
    const TILE_ROWS: usize = 8;
    const TILE_VECS: usize = 2;
    const WEIGHT_ROWS: usize = 8;
    // Unmeasured on AVX-512 (a blend per multiply-add): kept off.
    const PAIRED_WEIGHT_ROWS: bool = false;
    const FMA_CHAINS: usize = 12;
    // 16 sums are 16 of the 32 zmm registers.
    const GRAM_SIDE: usize = 4;

    #[inline(always)]
    fn zero(self) -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    fn zero_f64(self) -> [__m512d; 2] {
        unsafe { [_mm512_setzero_pd(); 2] }
    }
    #[inline(always)]
    fn add_squares_f64(self, acc: [__m512d; 2], x: __m512) -> [__m512d; 2] {
        unsafe {
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(x),
            )));
            [
                _mm512_fmadd_pd(lo, lo, acc[0]),
                _mm512_fmadd_pd(hi, hi, acc[1]),
            ]
        }
    }
    #[inline(always)]
    fn lanes_f64(self, acc: [__m512d; 2]) -> [f64; 16] {
        let mut out = [0.0; 16];
        // SAFETY: out has room for the 2 × 8 doubles stored.
        unsafe {
            _mm512_storeu_pd(out.as_mut_ptr(), acc[0]);
            _mm512_storeu_pd(out.as_mut_ptr().add(8), acc[1]);
        }
        out
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn splat_halves(self, lo: f32, hi: f32) -> __m512 {
        unsafe { _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(lo), _mm512_set1_ps(hi)) }
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_first(self, p: *const f32, n: usize) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(first(n), p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize, v: __m512) {
        unsafe { _mm512_mask_storeu_ps(p, first(n), v) }
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    fn sqrt(self, a: __m512) -> __m512 {
        unsafe { _mm512_sqrt_ps(a) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn neg_mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fnmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn min(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    fn round(self, a: __m512) -> __m512 {
        unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
    }
    #[inline(always)]
    fn exp2i(self, n: __m512) -> __m512 {
        unsafe {
            let biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased))
        }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m512) -> f32 {
        unsafe {
            let s8 = _mm256_add_ps(
                _mm512_castps512_ps256(v),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
            );
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
        }
    }
    #[inline(always)]
    fn reduce_max(self, v: __m512) -> f32 {
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    fn transpose(self, rows: [__m512; 16]) -> [__m512; 16] {
        unsafe { transpose16(rows) }
    }
    #[inline(always)]
    fn prefetch(self, p: *const f32) {
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

/// Transposes a 16 × 16 block held as 16 rows: out[c][r] = rows[r][c].
#[inline(always)]
unsafe fn transpose16(rows: [__m512; 16]) -> [__m512; 16] {
    // SAFETY: the caller holds an Avx512 token.
    unsafe {
        // 1. Interleave pairs of rows (32-bit elements).
        let t: [__m512; 16] = array_of(
            #[inline(always)]
            |i| {
                let (a, b) = (rows[i & !1], rows[i | 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_ps(a, b)
                } else {
                    _mm512_unpackhi_ps(a, b)
                }
            },
        );
        // 2. Interleave pairs of those (64-bit elements): u[4g + c] holds, in
        //    its 128-bit lane l, column c + 4l of rows 4g .. 4g+4.
        let u: [__m512; 16] = array_of(
            #[inline(always)]
            |i| {
                let (g, c) = (i / 4, i % 4);
                let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
                let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
                _mm512_castpd_ps(if c % 2 == 0 {
                    _mm512_unpacklo_pd(a, b)
                } else {
                    _mm512_unpackhi_pd(a, b)
                })
            },
        );
        // 3. Gather 128-bit lanes: for groups (0, 1) and (2, 3), lanes {0, 2} and {1, 3}.
        let v: [__m512; 16] = array_of(
            #[inline(always)]
            |i| {
                let (pair, c, odd) = (i / 8, i % 4, (i / 4) % 2 == 1);
                let (a, b) = (u[8 * pair + c], u[8 * pair + 4 + c]);
                if odd {
                    _mm512_shuffle_f32x4::<0xdd>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                }
            },
        );
        // 4. Final lanes: column c from (v[c], v[8 + c]) lanes {0, 2}, column
        //    c + 8 from lanes {1, 3}; columns c + 4 and c + 12 likewise from
        //    v[4 + c], v[12 + c].
        array_of(
            #[inline(always)]
            |col| {
                let (c, plus4, plus8) = (col % 4, (col / 4) % 2 == 1, col >= 8);
                let (a, b) = if plus4 {
                    (v[4 + c], v[12 + c])
                } else {
                    (v[c], v[8 + c])
                };
                if plus8 {
                    _mm512_shuffle_f32x4::<0xdd>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                }
            },
        )
    }
}
