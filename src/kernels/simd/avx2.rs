//! The vocabulary on AVX2 with FMA (x86-64-v3): a vector is two ymm
//! registers, lanes 0..8 and 8..16.

use std::arch::x86_64::*;

use super::{Simd, array_of};

/// Proof that this CPU has AVX2 and FMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// The token, if this CPU has AVX2 and FMA.
    pub(crate) fn detect() -> Option<Self> {
        let has = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        has.then_some(Avx2(()))
    }

    /// Runs `f` compiled for AVX2 and FMA, so the intrinsics it calls inline.
    #[inline(always)]
    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        #[target_feature(enable = "avx2,fma")]
        fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the token exists only when the CPU has these features.
        unsafe { with_avx2(f) }
    }
}

type V = [__m256; 2];

/// The lane mask of the first n (≤ 8) lanes of one ymm.
#[inline(always)]
unsafe fn first(n: usize) -> __m256i {
    const ONES: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: 8 − min(n, 8) ∈ 0..=8, so 8 ints from there are inside ONES;
    // the caller holds an Avx2 token.
    unsafe { _mm256_loadu_si256(ONES.as_ptr().add(8 - n.min(8)).cast()) }
}

#[inline(always)]
fn each(a: V, f: impl Fn(__m256) -> __m256) -> V {
    [f(a[0]), f(a[1])]
}

#[inline(always)]
fn both(a: V, b: V, f: impl Fn(__m256, __m256) -> __m256) -> V {
    [f(a[0], b[0]), f(a[1], b[1])]
}

// SAFETY (every `unsafe` block below without its own note): a value of
// `Avx2` exists only when the CPU has AVX2 and FMA (`detect`), so the
// intrinsics can run; pointer contracts are the callers', as the trait states.
impl Simd for Avx2 {
    type V = V;
    type D = [__m256d; 4];
    const TILE_ROWS: usize = 6;
    const TILE_VECS: usize = 1;
    const WEIGHT_ROWS: usize = 4;
    const PAIRED_WEIGHT_ROWS: bool = true;
    const FMA_CHAINS: usize = 6;
    // 16 sums would be 32 ymm registers: four 2 × 2 passes (8 ymm each).
    const GRAM_SIDE: usize = 2;

    #[inline(always)]
    fn zero(self) -> V {
        unsafe { [_mm256_setzero_ps(); 2] }
    }
    #[inline(always)]
    fn zero_f64(self) -> [__m256d; 4] {
        unsafe { [_mm256_setzero_pd(); 4] }
    }
    #[inline(always)]
    fn add_squares_f64(self, acc: [__m256d; 4], x: V) -> [__m256d; 4] {
        array_of(
            #[inline(always)]
            |i| unsafe {
                let half = if i % 2 == 0 {
                    _mm256_castps256_ps128(x[i / 2])
                } else {
                    _mm256_extractf128_ps::<1>(x[i / 2])
                };
                let w = _mm256_cvtps_pd(half);
                _mm256_fmadd_pd(w, w, acc[i])
            },
        )
    }
    #[inline(always)]
    fn lanes_f64(self, acc: [__m256d; 4]) -> [f64; 16] {
        let mut out = [0.0; 16];
        for (i, &a) in acc.iter().enumerate() {
            // SAFETY: out has room for the 4 × 4 doubles stored.
            unsafe { _mm256_storeu_pd(out.as_mut_ptr().add(4 * i), a) }
        }
        out
    }
    #[inline(always)]
    fn splat(self, x: f32) -> V {
        unsafe { [_mm256_set1_ps(x); 2] }
    }
    #[inline(always)]
    fn splat_halves(self, lo: f32, hi: f32) -> V {
        unsafe { [_mm256_set1_ps(lo), _mm256_set1_ps(hi)] }
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> V {
        unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
    }
    #[inline(always)]
    unsafe fn load_first(self, p: *const f32, n: usize) -> V {
        // Masked-off lanes are not read (and cannot fault); wrapping_add forms
        // the second half's address without claiming it is in bounds.
        unsafe {
            [
                _mm256_maskload_ps(p, first(n)),
                _mm256_maskload_ps(p.wrapping_add(8), first(n.saturating_sub(8))),
            ]
        }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: V) {
        unsafe {
            _mm256_storeu_ps(p, v[0]);
            _mm256_storeu_ps(p.add(8), v[1]);
        }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize, v: V) {
        unsafe {
            _mm256_maskstore_ps(p, first(n), v[0]);
            _mm256_maskstore_ps(p.wrapping_add(8), first(n.saturating_sub(8)), v[1]);
        }
    }
    #[inline(always)]
    fn add(self, a: V, b: V) -> V {
        both(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { _mm256_add_ps(x, y) },
        )
    }
    #[inline(always)]
    fn sub(self, a: V, b: V) -> V {
        both(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { _mm256_sub_ps(x, y) },
        )
    }
    #[inline(always)]
    fn mul(self, a: V, b: V) -> V {
        both(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { _mm256_mul_ps(x, y) },
        )
    }
    #[inline(always)]
    fn div(self, a: V, b: V) -> V {
        both(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { _mm256_div_ps(x, y) },
        )
    }
    #[inline(always)]
    fn sqrt(self, a: V) -> V {
        unsafe { [_mm256_sqrt_ps(a[0]), _mm256_sqrt_ps(a[1])] }
    }
    #[inline(always)]
    fn mul_add(self, a: V, b: V, c: V) -> V {
        unsafe {
            [
                _mm256_fmadd_ps(a[0], b[0], c[0]),
                _mm256_fmadd_ps(a[1], b[1], c[1]),
            ]
        }
    }
    #[inline(always)]
    fn neg_mul_add(self, a: V, b: V, c: V) -> V {
        unsafe {
            [
                _mm256_fnmadd_ps(a[0], b[0], c[0]),
                _mm256_fnmadd_ps(a[1], b[1], c[1]),
            ]
        }
    }
    #[inline(always)]
    fn max(self, a: V, b: V) -> V {
        both(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { _mm256_max_ps(x, y) },
        )
    }
    #[inline(always)]
    fn min(self, a: V, b: V) -> V {
        both(
            a,
            b,
            #[inline(always)]
            |x, y| unsafe { _mm256_min_ps(x, y) },
        )
    }
    #[inline(always)]
    fn round(self, a: V) -> V {
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        unsafe {
            [
                _mm256_round_ps::<NEAREST>(a[0]),
                _mm256_round_ps::<NEAREST>(a[1]),
            ]
        }
    }
    #[inline(always)]
    fn exp2i(self, n: V) -> V {
        each(
            n,
            #[inline(always)]
            |n| unsafe {
                let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased))
            },
        )
    }
    #[inline(always)]
    fn reduce_add(self, v: V) -> f32 {
        unsafe {
            let s8 = _mm256_add_ps(v[0], v[1]);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
        }
    }
    #[inline(always)]
    fn reduce_max(self, v: V) -> f32 {
        unsafe {
            let m8 = _mm256_max_ps(v[0], v[1]);
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)))
        }
    }
    #[inline(always)]
    fn transpose(self, rows: [V; 16]) -> [V; 16] {
        // Four 8 × 8 blocks: out[c] half h = transpose of rows (8h..8h+8)'s column-half c/8.
        // SAFETY: the token proves AVX (`transpose8` needs only that).
        let block = |h: usize, c: usize| unsafe { transpose8_of(&rows, h, c) };
        let (top_left, bottom_left) = (block(0, 0), block(1, 0));
        let (top_right, bottom_right) = (block(0, 1), block(1, 1));
        array_of(
            #[inline(always)]
            |c| {
                if c < 8 {
                    [top_left[c], bottom_left[c]]
                } else {
                    [top_right[c - 8], bottom_right[c - 8]]
                }
            },
        )
    }
    #[inline(always)]
    fn prefetch(self, p: *const f32) {
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

/// The transpose of rows 8h..8h+8's ymm half c.
///
/// # Safety
/// The caller holds an Avx2 token.
#[inline(always)]
unsafe fn transpose8_of(rows: &[V; 16], h: usize, c: usize) -> [__m256; 8] {
    // SAFETY: the caller holds an Avx2 token.
    unsafe {
        transpose8(array_of(
            #[inline(always)]
            |r| rows[8 * h + r][c],
        ))
    }
}

/// Transposes an 8 × 8 block: out[c] lane r = rows[r] lane c.
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: the caller holds an Avx2 token.
    unsafe {
        // Pairs of rows interleaved, then pairs of pairs (64-bit), then 128-bit halves.
        let t: [__m256; 8] = array_of(
            #[inline(always)]
            |i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            },
        );
        // u[4g + c] holds, in its 128-bit half l, column c + 4l of rows 4g .. 4g+4.
        let u: [__m256; 8] = array_of(
            #[inline(always)]
            |i| {
                let (g, c) = (i / 4, i % 4);
                let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
                if c % 2 == 0 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xEE>(a, b)
                }
            },
        );
        array_of(
            #[inline(always)]
            |col| {
                let (c, high) = (col % 4, col >= 4);
                if high {
                    _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c])
                } else {
                    _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c])
                }
            },
        )
    }
}
