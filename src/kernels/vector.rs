//! Vector kernels: the row-wise pieces of the model math that are not matrix
//! multiplies, each fused into as few passes as its data dependencies allow.
//!
//! Every kernel has a plain scalar version in [`reference`] — the readable
//! statement of what it computes, the fallback on CPUs without AVX-512, and the
//! baseline the tests compare against — and an AVX-512 version in `avx512`,
//! chosen at run time. The public functions below check their arguments and
//! dispatch; they are the only way in.

use std::sync::OnceLock;

/// True when this CPU runs the AVX-512 versions (checked once).
fn avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Calls `avx512::$name(args)` when the CPU has AVX-512F, else `reference::$name(args)`.
macro_rules! dispatch {
    ($name:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: the CPU supports AVX-512F (checked by `avx512()`), and the
            // caller checked every slice length the kernel relies on.
            return unsafe { avx512::$name($($arg),*) };
        }
        reference::$name($($arg),*)
    }};
}

/// Σ_i a_i·b_i
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    dispatch!(dot(a, b))
}

/// The 16 dot products of four rows with four others:
///   out[4·i + j] = a_i·b_j   (all eight rows of one length)
/// — a 4 × 4 block of a Gram matrix, each row loaded once for four dots.
pub fn dots_4x4(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 16] {
    let n = a[0].len();
    assert!(a.iter().chain(&b).all(|row| row.len() == n));
    dispatch!(dots_4x4(a, b))
}

/// Σ_i x_i², accumulated in f64.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    dispatch!(sum_of_squares(x))
}

/// y_i += α·x_i
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(x.len(), y.len());
    dispatch!(axpy(y, alpha, x))
}

/// y_i += x_i
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    axpy(y, 1.0, x);
}

/// x ← softmax(c·x), in place: x_i ← exp(c·(x_i − max x)) / Σ_j exp(c·(x_j − max x)), c > 0.
pub fn scaled_softmax_in_place(x: &mut [f32], c: f32) {
    if x.is_empty() {
        return;
    }
    dispatch!(scaled_softmax_in_place(x, c))
}

/// x ← softmax(x), in place (max-subtracted).
pub fn softmax_in_place(x: &mut [f32]) {
    scaled_softmax_in_place(x, 1.0);
}

/// σ(z) = 1 / (1 + e^(−z))
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// One row of cross-entropy and its gradient, in one pass over the logits:
///   lse = log Σ_v exp(z_v);  returns lse − z_y
///   dz_v = scale·(softmax(z)_v − [v = y])
pub fn cross_entropy_row(dz: &mut [f32], z: &[f32], target: usize, scale: f32) -> f32 {
    assert!(dz.len() == z.len() && target < z.len());
    dispatch!(cross_entropy_row(dz, z, target, scale))
}

/// SwiGLU forward for rows of [gate | up] (each 2F wide) → act (F wide):
///   act = silu(g) ⊙ u,  silu(g) = g·σ(g)
pub fn swiglu_forward(act: &mut [f32], gate_up: &[f32], f: usize) {
    assert!(f > 0 && act.len().is_multiple_of(f) && gate_up.len() == 2 * act.len());
    dispatch!(swiglu_forward(act, gate_up, f))
}

/// SwiGLU backward, row by row → dgate_up [n, 2F] (overwritten):
///   du = dact ⊙ silu(g);   dg = dact ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))
pub fn swiglu_backward(dgate_up: &mut [f32], dact: &[f32], gate_up: &[f32], f: usize) {
    assert!(
        f > 0
            && dact.len().is_multiple_of(f)
            && gate_up.len() == 2 * dact.len()
            && dgate_up.len() == gate_up.len()
    );
    dispatch!(swiglu_backward(dgate_up, dact, gate_up, f))
}

/// RMSNorm of the rows of x [T, h] (h = γ.len()):
///   r_t = 1/sqrt(mean_j x_tj² + eps);  y_tj = γ_j · x_tj · r_t;  inv_rms_t = r_t
pub fn rmsnorm(y: &mut [f32], inv_rms: &mut [f32], x: &[f32], gamma: &[f32], eps: f32) {
    let h = gamma.len();
    assert!(h > 0 && y.len() == x.len() && x.len() == inv_rms.len() * h);
    dispatch!(rmsnorm(y, inv_rms, x, gamma, eps))
}

/// RMSNorm backward over the rows of x [T, h], with x̂ = x·r and g = γ ⊙ dy:
///   dγ += Σ_t dy_t ⊙ x̂_t;   dx_t += r_t·(g_t − x̂_t·(g_t·x̂_t)/h)
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dy: &[f32],
    x: &[f32],
    inv_rms: &[f32],
    gamma: &[f32],
) {
    let h = gamma.len();
    assert!(
        h > 0
            && dgamma.len() == h
            && x.len() == inv_rms.len() * h
            && dx.len() == x.len()
            && dy.len() == x.len()
    );
    dispatch!(rmsnorm_backward(dx, dgamma, dy, x, inv_rms, gamma))
}

/// The per-step constants of one AdamW update (CONTRACT §6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Gradient multiplier (the clipping factor).
    pub grad_scale: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 − β1, formed in f64 before rounding (1 − β1 of an f32 β1 is off by up
    /// to ulp(β1)/(1 − β1) relative: 1.3e-5 for β 0.999).
    pub one_minus_beta1: f32,
    /// 1 − β2, likewise.
    pub one_minus_beta2: f32,
    /// 1/(1 − β1ᵗ).
    pub inv_bias1: f32,
    /// 1/(1 − β2ᵗ).
    pub inv_bias2: f32,
    /// Learning rate of this step.
    pub lr: f32,
    /// eps.
    pub eps: f32,
    /// lr·weight_decay for decayed tensors, 0 otherwise.
    pub decay: f32,
}

impl AdamWStep {
    /// The constants of step `t` (1-based) for β1, β2, ε and learning rate
    /// `lr`, every derived one formed in f64 before rounding to f32; no
    /// clipping (grad_scale 1) and no decay — set those per tensor.
    pub fn new((beta1, beta2): (f64, f64), eps: f64, lr: f64, t: u64) -> Self {
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        AdamWStep {
            grad_scale: 1.0,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            inv_bias1: (1.0 / (1.0 - beta1.powi(t))) as f32,
            inv_bias2: (1.0 / (1.0 - beta2.powi(t))) as f32,
            lr: lr as f32,
            eps: eps as f32,
            decay: 0.0,
        }
    }
}

/// AdamW over one tensor, in one pass on this thread (a whole model's update
/// on the intra-op threads: [`super::adamw_tensors`]):
///   g ← s·g;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
///   p ← p − lr·wd·p;  p ← p − lr·(m/(1−β1ᵗ)) / (sqrt(v/(1−β2ᵗ)) + eps)
/// (the bias corrections are applied as multiplications by their reciprocals).
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: AdamWStep) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    dispatch!(adamw(p, g, m, v, step))
}

/// The scalar statement of every kernel.
pub mod reference {
    use super::AdamWStep;

    /// Σ_i a_i·b_i with eight partial sums.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
        let (b8, b_rest) = b.split_at(a8.len());
        for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        let mut sum =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (x, y) in a_rest.iter().zip(b_rest) {
            sum += x * y;
        }
        sum
    }

    /// Each of the 16 dots by [`dot`].
    pub fn dots_4x4(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 16] {
        std::array::from_fn(|k| dot(a[k / 4], b[k % 4]))
    }

    /// Σ x² in f64.
    pub fn sum_of_squares(x: &[f32]) -> f64 {
        x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
    }

    /// y += α·x
    pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
    }

    /// x ← softmax(c·x)
    pub fn scaled_softmax_in_place(x: &mut [f32], c: f32) {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for v in x.iter_mut() {
            *v = ((*v - max) * c).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inv;
        }
    }

    /// Cross-entropy of one row and its scaled gradient.
    pub fn cross_entropy_row(dz: &mut [f32], z: &[f32], target: usize, scale: f32) -> f32 {
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for (d, &v) in dz.iter_mut().zip(z) {
            *d = (v - max).exp();
            sum += *d;
        }
        let factor = scale / sum;
        for d in dz.iter_mut() {
            *d *= factor;
        }
        dz[target] -= scale;
        max + sum.ln() - z[target]
    }

    /// act = silu(g) ⊙ u
    pub fn swiglu_forward(act: &mut [f32], gate_up: &[f32], f: usize) {
        for (a, gu) in act.chunks_exact_mut(f).zip(gate_up.chunks_exact(2 * f)) {
            let (g, u) = gu.split_at(f);
            for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                *a = g * super::sigmoid(g) * u;
            }
        }
    }

    /// du = dact ⊙ silu(g);  dg = dact ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))
    pub fn swiglu_backward(dgate_up: &mut [f32], dact: &[f32], gate_up: &[f32], f: usize) {
        let rows = dgate_up.chunks_exact_mut(2 * f).zip(dact.chunks_exact(f));
        for ((dgu, da), gu) in rows.zip(gate_up.chunks_exact(2 * f)) {
            let (dg, du) = dgu.split_at_mut(f);
            let (g, u) = gu.split_at(f);
            for j in 0..f {
                let s = super::sigmoid(g[j]);
                du[j] = da[j] * g[j] * s;
                dg[j] = da[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
            }
        }
    }

    /// y_t = γ ⊙ x_t·r_t, r_t = 1/sqrt(mean(x_t²) + eps), row by row
    pub fn rmsnorm(y: &mut [f32], inv_rms: &mut [f32], x: &[f32], gamma: &[f32], eps: f32) {
        let h = gamma.len();
        let rows = y.chunks_exact_mut(h).zip(x.chunks_exact(h));
        for ((y, x), r) in rows.zip(inv_rms) {
            *r = 1.0 / (dot(x, x) / h as f32 + eps).sqrt();
            for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
                *y = g * (x * *r);
            }
        }
    }

    /// dγ += dy_t ⊙ x̂_t;  dx_t += r_t·(γ⊙dy_t − x̂_t·(γ⊙dy_t · x̂_t)/h), row by row
    pub fn rmsnorm_backward(
        dx: &mut [f32],
        dgamma: &mut [f32],
        dy: &[f32],
        x: &[f32],
        inv_rms: &[f32],
        gamma: &[f32],
    ) {
        let h = gamma.len();
        let rows = dx
            .chunks_exact_mut(h)
            .zip(dy.chunks_exact(h))
            .zip(x.chunks_exact(h));
        for (((dx, dy), x), &r) in rows.zip(inv_rms) {
            let mut g_dot_xhat = 0.0f32;
            for j in 0..h {
                let xhat = x[j] * r;
                dgamma[j] += dy[j] * xhat;
                g_dot_xhat += gamma[j] * dy[j] * xhat;
            }
            let c = g_dot_xhat / h as f32;
            for j in 0..h {
                dx[j] += r * (gamma[j] * dy[j] - x[j] * r * c);
            }
        }
    }

    /// One AdamW update of one tensor.
    pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
        for i in 0..p.len() {
            let g = g[i] * s.grad_scale;
            m[i] = s.beta1 * m[i] + s.one_minus_beta1 * g;
            v[i] = s.beta2 * v[i] + s.one_minus_beta2 * g * g;
            let w = p[i] - s.decay * p[i];
            p[i] = w - s.lr * (m[i] * s.inv_bias1) / ((v[i] * s.inv_bias2).sqrt() + s.eps);
        }
    }
}

/// AVX-512 versions: the same arithmetic on 16 lanes, with masked tails.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::AdamWStep;

    /// Mask of the first `n` (≤ 16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// 16 floats from `x[i..]` (zeros past its end).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load(x: &[f32], i: usize) -> __m512 {
        debug_assert!(i < x.len());
        // SAFETY: only the lanes below x.len() − i are read (the mask; none
        // when i ≥ x.len(), so the pointer, formed without an out-of-bounds
        // `add`, is then not dereferenced): sound for any i, in release too.
        unsafe {
            _mm512_maskz_loadu_ps(lanes(x.len().saturating_sub(i)), x.as_ptr().wrapping_add(i))
        }
    }

    /// Writes the lanes of `v` that fall inside `x[i..]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store(x: &mut [f32], i: usize, v: __m512) {
        debug_assert!(i < x.len());
        // SAFETY: only the lanes below x.len() − i are written (the mask; none
        // when i ≥ x.len(), as in `load`): sound for any i, in release too.
        unsafe {
            let n = x.len().saturating_sub(i);
            _mm512_mask_storeu_ps(x.as_mut_ptr().wrapping_add(i), lanes(n), v)
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn splat(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }

    /// e^x on 16 lanes (Cephes expf: |error| ≤ 2 ulp on the clamped range):
    ///   n = round(x·log2 e);  r = x − n·ln 2 (in two parts);  e^r ≈ 1 + r + r²·P(r);  e^x = 2ⁿ·e^r
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        // Below −104 the result underflows to 0 through scalef; above 88.7 it would overflow.
        let x = _mm512_min_ps(_mm512_max_ps(x, splat(-104.0)), splat(88.72));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, splat(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, splat(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, splat(-2.121_944_4e-4), r);
        let mut p = splat(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, splat(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let e_r = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), splat(1.0));
        _mm512_scalef_ps(e_r, n)
    }

    /// σ(z) = 1/(1 + e^(−z)) on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sigmoid(z: __m512) -> __m512 {
        let one = splat(1.0);
        _mm512_div_ps(
            one,
            _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), z))),
        )
    }

    #[target_feature(enable = "avx512f")]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= a.len() {
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(load(a, i + 16 * k), load(b, i + 16 * k), *acc);
            }
            i += 64;
        }
        while i < a.len() {
            acc[0] = _mm512_fmadd_ps(load(a, i), load(b, i), acc[0]);
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }

    /// Sixteen 16-lane accumulators, one per dot: each step loads eight
    /// vectors for sixteen multiply-adds.
    #[target_feature(enable = "avx512f")]
    pub fn dots_4x4(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 16] {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        for i in (0..a[0].len()).step_by(16) {
            let bv = b.map(|row| load(row, i));
            for (acc_r, row) in acc.iter_mut().zip(a) {
                let av = load(row, i);
                for (acc, &bv) in acc_r.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(av, bv, *acc);
                }
            }
        }
        let sums = lane_sums(std::array::from_fn(|k| acc[k / 4][k % 4]));
        let mut out = [0.0f32; 16];
        // SAFETY: `out` holds the 16 floats stored.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sums) };
        out
    }

    /// Lane k = the sum of the lanes of v[k], for 16 vectors at once: each
    /// level adds pairs of vectors after interleaving them, halving the
    /// vectors and doubling the lanes each sum covers (45 instructions
    /// instead of 16 separate reductions' 128):
    ///   4 lanes of 128 bits: (A0+A2, B0+B2, A1+A3, B1+B3)  ← v[2i], v[2i+1]
    ///   then (A, B, C, D) per 128 bits, then 128-bit halves, then whole.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn lane_sums(v: [__m512; 16]) -> __m512 {
        let l1: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        let l2: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (l1[2 * i], l1[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xEE>(a, b),
            )
        });
        let halves = |a, b| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        };
        halves(halves(l2[0], l2[1]), halves(l2[2], l2[3]))
    }

    #[target_feature(enable = "avx512f")]
    pub fn sum_of_squares(x: &[f32]) -> f64 {
        let mut acc = [_mm512_setzero_pd(); 2];
        for i in (0..x.len()).step_by(16) {
            let v = load(x, i);
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            )));
            acc[0] = _mm512_fmadd_pd(lo, lo, acc[0]);
            acc[1] = _mm512_fmadd_pd(hi, hi, acc[1]);
        }
        _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1]))
    }

    #[target_feature(enable = "avx512f")]
    pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let a = splat(alpha);
        for i in (0..y.len()).step_by(16) {
            store(y, i, _mm512_fmadd_ps(a, load(x, i), load(y, i)));
        }
    }

    /// Largest value of `x` (lanes past the end count as −∞).
    #[target_feature(enable = "avx512f")]
    fn max(x: &[f32]) -> f32 {
        let mut m = splat(f32::NEG_INFINITY);
        for i in (0..x.len()).step_by(16) {
            // SAFETY: masked load of the lanes inside `x`; the others keep −∞.
            let v = unsafe {
                _mm512_mask_loadu_ps(
                    splat(f32::NEG_INFINITY),
                    lanes(x.len() - i),
                    x.as_ptr().add(i),
                )
            };
            m = _mm512_max_ps(m, v);
        }
        _mm512_reduce_max_ps(m)
    }

    #[target_feature(enable = "avx512f")]
    fn scale(x: &mut [f32], s: f32) {
        let s = splat(s);
        for i in (0..x.len()).step_by(16) {
            store(x, i, _mm512_mul_ps(load(x, i), s));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn scaled_softmax_in_place(x: &mut [f32], c: f32) {
        let (m, cv) = (splat(max(x)), splat(c));
        let mut sum = _mm512_setzero_ps();
        for i in (0..x.len()).step_by(16) {
            let e = exp(_mm512_mul_ps(_mm512_sub_ps(load(x, i), m), cv));
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(lanes(x.len() - i), e));
            store(x, i, e);
        }
        scale(x, 1.0 / _mm512_reduce_add_ps(sum));
    }

    #[target_feature(enable = "avx512f")]
    pub fn cross_entropy_row(dz: &mut [f32], z: &[f32], target: usize, s: f32) -> f32 {
        let max = max(z);
        let m = splat(max);
        let mut acc = _mm512_setzero_ps();
        for i in (0..z.len()).step_by(16) {
            let e = exp(_mm512_sub_ps(load(z, i), m));
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(lanes(z.len() - i), e));
            store(dz, i, e);
        }
        let sum = _mm512_reduce_add_ps(acc);
        scale(dz, s / sum);
        dz[target] -= s;
        max + sum.ln() - z[target]
    }

    #[target_feature(enable = "avx512f")]
    pub fn swiglu_forward(act: &mut [f32], gate_up: &[f32], f: usize) {
        for (a, gu) in act.chunks_exact_mut(f).zip(gate_up.chunks_exact(2 * f)) {
            let (g, u) = gu.split_at(f);
            for i in (0..f).step_by(16) {
                let gv = load(g, i);
                store(
                    a,
                    i,
                    _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid(gv)), load(u, i)),
                );
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn swiglu_backward(dgate_up: &mut [f32], dact: &[f32], gate_up: &[f32], f: usize) {
        let one = splat(1.0);
        let rows = dgate_up.chunks_exact_mut(2 * f).zip(dact.chunks_exact(f));
        for ((dgu, da), gu) in rows.zip(gate_up.chunks_exact(2 * f)) {
            let (dg, du) = dgu.split_at_mut(f);
            let (g, u) = gu.split_at(f);
            for i in (0..f).step_by(16) {
                let (gv, uv, dav) = (load(g, i), load(u, i), load(da, i));
                let s = sigmoid(gv);
                store(du, i, _mm512_mul_ps(dav, _mm512_mul_ps(gv, s)));
                // σ(1 + g(1 − σ))
                let dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
                store(dg, i, _mm512_mul_ps(_mm512_mul_ps(dav, uv), dsilu));
            }
        }
    }

    /// Sixteen rows at a time: their sums of squares first, then one vector
    /// sqrt and divide for all sixteen r_t (IEEE-exact, as the scalar formula).
    #[target_feature(enable = "avx512f")]
    pub fn rmsnorm(y: &mut [f32], inv_rms: &mut [f32], x: &[f32], gamma: &[f32], eps: f32) {
        let h = gamma.len();
        let blocks = y
            .chunks_mut(16 * h)
            .zip(x.chunks(16 * h))
            .zip(inv_rms.chunks_mut(16));
        for ((y, x), inv_rms) in blocks {
            let mut sums = [0.0f32; 16];
            for (s, x) in sums.iter_mut().zip(x.chunks_exact(h)) {
                *s = dot(x, x);
            }
            let mean = _mm512_div_ps(load(&sums, 0), splat(h as f32));
            let r = _mm512_div_ps(splat(1.0), _mm512_sqrt_ps(_mm512_add_ps(mean, splat(eps))));
            store(inv_rms, 0, r);
            for ((y, x), &r) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(&*inv_rms) {
                let rv = splat(r);
                for i in (0..h).step_by(16) {
                    store(
                        y,
                        i,
                        _mm512_mul_ps(load(gamma, i), _mm512_mul_ps(load(x, i), rv)),
                    );
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn rmsnorm_backward(
        dx: &mut [f32],
        dgamma: &mut [f32],
        dy: &[f32],
        x: &[f32],
        inv_rms: &[f32],
        gamma: &[f32],
    ) {
        let h = gamma.len();
        let rows = dx
            .chunks_exact_mut(h)
            .zip(dy.chunks_exact(h))
            .zip(x.chunks_exact(h));
        for (((dx, dy), x), &r) in rows.zip(inv_rms) {
            let rv = splat(r);
            let mut acc = _mm512_setzero_ps();
            for i in (0..h).step_by(16) {
                let xhat = _mm512_mul_ps(load(x, i), rv);
                let dyv = load(dy, i);
                store(dgamma, i, _mm512_fmadd_ps(dyv, xhat, load(dgamma, i)));
                acc = _mm512_fmadd_ps(_mm512_mul_ps(load(gamma, i), dyv), xhat, acc);
            }
            let c = splat(_mm512_reduce_add_ps(acc) / h as f32);
            for i in (0..h).step_by(16) {
                let g = _mm512_mul_ps(load(gamma, i), load(dy, i));
                let xhat = _mm512_mul_ps(load(x, i), rv);
                let d = _mm512_mul_ps(rv, _mm512_fnmadd_ps(xhat, c, g));
                store(dx, i, _mm512_add_ps(load(dx, i), d));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
        let (b1, b2) = (splat(s.beta1), splat(s.beta2));
        let (c1, c2) = (splat(s.one_minus_beta1), splat(s.one_minus_beta2));
        let (inv_bias1, inv_bias2) = (splat(s.inv_bias1), splat(s.inv_bias2));
        let (lr, eps, decay, gs) = (
            splat(s.lr),
            splat(s.eps),
            splat(s.decay),
            splat(s.grad_scale),
        );
        for i in (0..p.len()).step_by(16) {
            let gv = _mm512_mul_ps(load(g, i), gs);
            let mv = _mm512_add_ps(_mm512_mul_ps(b1, load(m, i)), _mm512_mul_ps(c1, gv));
            let vv = _mm512_add_ps(
                _mm512_mul_ps(b2, load(v, i)),
                _mm512_mul_ps(_mm512_mul_ps(c2, gv), gv),
            );
            store(m, i, mv);
            store(v, i, vv);
            let pv = load(p, i);
            let w = _mm512_sub_ps(pv, _mm512_mul_ps(decay, pv));
            let denom = _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(vv, inv_bias2)), eps);
            let update = _mm512_div_ps(_mm512_mul_ps(lr, _mm512_mul_ps(mv, inv_bias1)), denom);
            store(p, i, _mm512_sub_ps(w, update));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .map(|v| v * scale)
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    // Lengths straddle the 16-lane width so masked tails are exercised.
    const LENS: [usize; 6] = [1, 7, 16, 17, 64, 1000];

    #[test]
    fn simd_dot_axpy_and_sum_of_squares_match_the_reference() {
        for n in LENS {
            let (a, b) = (data(n, 1, 1.0), data(n, 2, 1.0));
            assert!((dot(&a, &b) - reference::dot(&a, &b)).abs() <= 1e-5 * n as f32);
            // Eight distinct rows, so a dot in the wrong place shows.
            let rows: Vec<Vec<f32>> = (0..8).map(|k| data(n, 10 + k, 1.0)).collect();
            let four = |first: usize| std::array::from_fn(|i| rows[first + i].as_slice());
            let (got, want) = (
                dots_4x4(four(0), four(4)),
                reference::dots_4x4(four(0), four(4)),
            );
            close(&got, &want, 1e-5 * n as f32, "dots_4x4");
            assert!((sum_of_squares(&a) - reference::sum_of_squares(&a)).abs() <= 1e-9 * n as f64);
            let (mut y1, mut y2) = (b.clone(), b.clone());
            axpy(&mut y1, 0.5, &a);
            reference::axpy(&mut y2, 0.5, &a);
            close(&y1, &y2, 1e-6, "axpy");
        }
    }

    #[test]
    fn simd_softmax_and_cross_entropy_match_the_reference() {
        for n in LENS {
            let z = data(n, 3, 20.0);
            let (mut a, mut b) = (z.clone(), z.clone());
            scaled_softmax_in_place(&mut a, 0.25);
            reference::scaled_softmax_in_place(&mut b, 0.25);
            close(&a, &b, 1e-6, "softmax");
            let target = n / 2;
            let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
            let la = cross_entropy_row(&mut da, &z, target, 0.5);
            let lb = reference::cross_entropy_row(&mut db, &z, target, 0.5);
            assert!((la - lb).abs() <= 1e-5 * lb.abs().max(1.0), "{la} vs {lb}");
            close(&da, &db, 1e-6, "dlogits");
        }
        // Extreme inputs: exp underflows to zero, never to NaN.
        let mut x = [0.0, -1e30, f32::NEG_INFINITY, -200.0];
        softmax_in_place(&mut x);
        assert_eq!(x, [1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn simd_swiglu_matches_the_reference() {
        for f in [1, 16, 17, 256] {
            let gu = data(3 * 2 * f, 4, 6.0);
            let da = data(3 * f, 5, 1.0);
            let (mut a1, mut a2) = (vec![0.0; 3 * f], vec![0.0; 3 * f]);
            swiglu_forward(&mut a1, &gu, f);
            reference::swiglu_forward(&mut a2, &gu, f);
            close(&a1, &a2, 1e-6, "swiglu");
            let (mut d1, mut d2) = (vec![0.0; 6 * f], vec![0.0; 6 * f]);
            swiglu_backward(&mut d1, &da, &gu, f);
            reference::swiglu_backward(&mut d2, &da, &gu, f);
            close(&d1, &d2, 1e-6, "swiglu backward");
        }
    }

    #[test]
    fn simd_rmsnorm_matches_the_reference() {
        for (rows, h) in [(1, 1), (3, 16), (17, 17), (64, 64), (33, 256)] {
            let (x, g, dy) = (
                data(rows * h, 6, 3.0),
                data(h, 7, 1.0),
                data(rows * h, 8, 1.0),
            );
            let (mut y1, mut y2) = (vec![0.0; rows * h], vec![0.0; rows * h]);
            let (mut r1, mut r2) = (vec![0.0; rows], vec![0.0; rows]);
            rmsnorm(&mut y1, &mut r1, &x, &g, 1e-6);
            reference::rmsnorm(&mut y2, &mut r2, &x, &g, 1e-6);
            close(&r1, &r2, 1e-6, "rmsnorm r");
            close(&y1, &y2, 1e-6, "rmsnorm");
            let (mut dx1, mut dg1) = (vec![0.1; rows * h], vec![0.2; h]);
            let (mut dx2, mut dg2) = (dx1.clone(), dg1.clone());
            rmsnorm_backward(&mut dx1, &mut dg1, &dy, &x, &r1, &g);
            reference::rmsnorm_backward(&mut dx2, &mut dg2, &dy, &x, &r1, &g);
            close(&dx1, &dx2, 1e-5, "rmsnorm dx");
            close(&dg1, &dg2, 1e-5, "rmsnorm dgamma");
        }
    }

    #[test]
    fn simd_adamw_matches_the_reference() {
        let step = AdamWStep {
            grad_scale: 0.5,
            decay: 1e-4,
            ..AdamWStep::new((0.9, 0.95), 1e-8, 1e-3, 3)
        };
        for n in LENS {
            let (p0, g, m0, v0) = (
                data(n, 9, 1.0),
                data(n, 10, 2.0),
                data(n, 11, 0.1),
                data(n, 12, 0.01),
            );
            let v0: Vec<f32> = v0.iter().map(|v| v.abs()).collect();
            let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
            let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
            adamw(&mut p1, &g, &mut m1, &mut v1, step);
            reference::adamw(&mut p2, &g, &mut m2, &mut v2, step);
            close(&p1, &p2, 1e-7, "p");
            close(&m1, &m2, 1e-7, "m");
            close(&v1, &v2, 1e-7, "v");
        }
    }
}
