//! Vector kernels: the row-wise pieces of the model math that are not matrix
//! multiplies, each fused into as few passes as its data dependencies allow.
//!
//! Every kernel has a plain scalar version in [`reference`] — the readable
//! statement of what it computes, and the baseline the tests compare against —
//! and one SIMD version in `lanes`, written once over the 16-lane vocabulary
//! of [`super::simd`] and run at this process's level. The public functions
//! below check their arguments and dispatch; they are the only way in.
//!
//! The kernels over many independent rows (SwiGLU, RMSNorm forward,
//! cross-entropy) split them into pieces for the intra-op threads
//! ([`by_rows`]); a row's arithmetic never depends on the split, so the
//! bits do not either.

use super::simd::{self, simd_call};
use super::threads;

/// Calls `lanes::$name(simd, args)` at this process's SIMD level.
macro_rules! dispatch {
    ($name:ident($($arg:expr),*)) => {
        simd_call!(simd::active(), lanes::$name($($arg),*))
    };
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

/// Floats a piece of a row-wise kernel reads at least, when the rows are
/// split over the intra-op threads (64 KB: tens of microseconds of work,
/// against about one for handing a piece over).
const PIECE_FLOATS: usize = 1 << 14;

/// Rows per piece of a row-wise kernel whose rows are `width` floats wide.
fn by_rows(width: usize) -> usize {
    (PIECE_FLOATS / width.max(1)).max(1)
}

/// Cross-entropy and its gradient on every row of z [T, V] (V = z.len() / T),
/// in one pass over each row's logits:
///   lse_t = log Σ_v exp(z_tv);  losses[t] = lse_t − z_{t,y_t}
///   dz_tv = scale·(softmax(z_t)_v − [v = y_t])
pub fn cross_entropy_rows(
    dz: &mut [f32],
    losses: &mut [f32],
    z: &[f32],
    targets: &[u32],
    scale: f32,
) {
    let t = targets.len();
    assert!(t > 0 && losses.len() == t && dz.len() == z.len() && z.len().is_multiple_of(t));
    let vocab = z.len() / t;
    assert!(vocab > 0 && targets.iter().all(|&y| (y as usize) < vocab));
    let rows = by_rows(vocab);
    let pieces = dz
        .chunks_mut(rows * vocab)
        .zip(losses.chunks_mut(rows))
        .zip(z.chunks(rows * vocab).zip(targets.chunks(rows)));
    threads::for_each_claimed(pieces, &|((dz, losses), (z, targets))| {
        let rows = dz.chunks_exact_mut(vocab).zip(z.chunks_exact(vocab));
        for ((loss, (dz, z)), &y) in losses.iter_mut().zip(rows).zip(targets) {
            *loss = dispatch!(cross_entropy_row(dz, z, y as usize, scale));
        }
    });
}

/// SwiGLU forward for rows of [gate | up] (each 2F wide) → act (F wide):
///   act = silu(g) ⊙ u,  silu(g) = g·σ(g)
pub fn swiglu_forward(act: &mut [f32], gate_up: &[f32], f: usize) {
    assert!(f > 0 && act.len().is_multiple_of(f) && gate_up.len() == 2 * act.len());
    let rows = by_rows(2 * f);
    let pieces = act.chunks_mut(rows * f).zip(gate_up.chunks(rows * 2 * f));
    threads::for_each_claimed(pieces, &|(act, gate_up)| {
        dispatch!(swiglu_forward(act, gate_up, f))
    });
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
    let rows = by_rows(3 * f);
    let pieces = dgate_up
        .chunks_mut(rows * 2 * f)
        .zip(dact.chunks(rows * f).zip(gate_up.chunks(rows * 2 * f)));
    threads::for_each_claimed(pieces, &|(dgate_up, (dact, gate_up))| {
        dispatch!(swiglu_backward(dgate_up, dact, gate_up, f))
    });
}

/// RMSNorm of the rows of x [T, h] (h = γ.len()):
///   r_t = 1/sqrt(mean_j x_tj² + eps);  y_tj = γ_j · x_tj · r_t;  inv_rms_t = r_t
pub fn rmsnorm(y: &mut [f32], inv_rms: &mut [f32], x: &[f32], gamma: &[f32], eps: f32) {
    let h = gamma.len();
    assert!(h > 0 && y.len() == x.len() && x.len() == inv_rms.len() * h);
    let rows = by_rows(h);
    let pieces = y
        .chunks_mut(rows * h)
        .zip(inv_rms.chunks_mut(rows))
        .zip(x.chunks(rows * h));
    threads::for_each_claimed(pieces, &|((y, inv_rms), x)| {
        dispatch!(rmsnorm(y, inv_rms, x, gamma, eps))
    });
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

/// The SIMD versions: the same formulas as [`reference`] on 16 lanes at a
/// time, written once over [`Simd`] (so the same bits at every level). Sums
/// keep 16 (or 64) partial sums, lane i taking elements i, i + 16, …, and
/// end with [`Simd::reduce_add`]'s tree.
mod lanes {
    use super::AdamWStep;
    use crate::kernels::simd::{
        Lanes, Simd, array_of, exp, for_each_vector, load_at, sigmoid, store_at,
    };

    /// Σ a_i·b_i: 64 partial sums (four vectors) while 64 elements remain,
    /// then the first vector takes the rest; ((s0 + s1) + (s2 + s3)) is reduced.
    #[inline(always)]
    pub fn dot<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [s.zero(); 4];
        let mut i = 0;
        while i + 64 <= a.len() {
            for (k, acc) in acc.iter_mut().enumerate() {
                let (j, at) = (i + 16 * k, Lanes::Whole);
                *acc = s.mul_add(at.load(s, a, j), at.load(s, b, j), *acc);
            }
            i += 64;
        }
        while i < a.len() {
            acc[0] = s.mul_add(load_at(s, a, i), load_at(s, b, i), acc[0]);
            i += 16;
        }
        s.reduce_add(s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3])))
    }

    /// The sixteen dots a_r·b_c, each kept as 16 lane sums in element order
    /// and reduced by [`Simd::reduce_add`]'s tree at the end (on 64-float rows the
    /// 16 reductions took 0.70× (AVX-512) and 0.83× (AVX2) the time of one
    /// 16 × 16 transpose and the same tree across its vectors). The block is taken
    /// [`Simd::GRAM_SIDE`]² dots per pass over the rows, as many sums as stay
    /// in registers beside the rows' vectors (AVX-512: all 16 in one pass;
    /// AVX2 and NEON, whose 16-lane vector is 2 or 4 registers: four passes of
    /// 2 × 2). A dot's lanes see the same products in the same order either way.
    #[inline(always)]
    pub fn dots_4x4<S: Simd>(s: S, a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 16] {
        let mut out = [0.0f32; 16];
        if S::GRAM_SIDE == 4 {
            dots_into::<S, 4>(s, &mut out, (a, 0), (b, 0));
        } else {
            for (r0, c0) in [(0, 0), (0, 2), (2, 0), (2, 2)] {
                dots_into::<S, 2>(s, &mut out, (a, r0), (b, c0));
            }
        }
        out
    }

    /// out[4·(r0 + r) + c0 + c] = a_{r0+r}·b_{c0+c} for r, c < N.
    #[inline(always)]
    fn dots_into<S: Simd, const N: usize>(
        s: S,
        out: &mut [f32; 16],
        (a, r0): ([&[f32]; 4], usize),
        (b, c0): ([&[f32]; 4], usize),
    ) {
        let sums = dot_block(s, rows_from::<N>(a, r0), rows_from::<N>(b, c0));
        for (r, sums) in sums.iter().enumerate() {
            for (c, &v) in sums.iter().enumerate() {
                out[4 * (r0 + r) + c0 + c] = s.reduce_add(v);
            }
        }
    }

    /// Rows first .. first + N of four.
    #[inline(always)]
    fn rows_from<const N: usize>(x: [&[f32]; 4], first: usize) -> [&[f32]; N] {
        array_of(
            #[inline(always)]
            |k| x[first + k],
        )
    }

    /// The N × N dots a_r·b_c as lane sums: each step loads 2N vectors for
    /// N² multiply-adds.
    #[inline(always)]
    fn dot_block<S: Simd, const N: usize>(s: S, a: [&[f32]; N], b: [&[f32]; N]) -> [[S::V; N]; N] {
        let mut acc = [[s.zero(); N]; N];
        for_each_vector(
            a[0].len(),
            #[inline(always)]
            |i, at| {
                let bv: [S::V; N] = array_of(
                    #[inline(always)]
                    |c| at.load(s, b[c], i),
                );
                for (row, acc) in a.iter().zip(acc.iter_mut()) {
                    let av = at.load(s, row, i);
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = s.mul_add(av, bv, *acc);
                    }
                }
            },
        );
        acc
    }

    /// Σ x² in f64: 16 partial sums, then the same tree as `reduce_add`.
    #[inline(always)]
    pub fn sum_of_squares<S: Simd>(s: S, x: &[f32]) -> f64 {
        // The tail's missing lanes load as +0, and acc + 0² = acc exactly.
        let mut acc = s.zero_f64();
        for_each_vector(
            x.len(),
            #[inline(always)]
            |i, at| acc = s.add_squares_f64(acc, at.load(s, x, i)),
        );
        let mut acc = s.lanes_f64(acc);
        for half in [8, 4, 2, 1] {
            for i in 0..half {
                acc[i] += acc[i + half];
            }
        }
        acc[0]
    }

    #[inline(always)]
    pub fn axpy<S: Simd>(s: S, y: &mut [f32], alpha: f32, x: &[f32]) {
        let a = s.splat(alpha);
        for_each_vector(
            y.len(),
            #[inline(always)]
            |i, at| at.store(s, y, i, s.mul_add(a, at.load(s, x, i), at.load(s, y, i))),
        );
    }

    /// Largest value of `x` (exact, so any order).
    #[inline(always)]
    fn max<S: Simd>(s: S, x: &[f32]) -> f32 {
        let chunks = x.chunks_exact(16);
        let tail = chunks
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut m = s.splat(f32::NEG_INFINITY);
        for c in chunks {
            m = s.max(m, load_at(s, c, 0));
        }
        s.reduce_max(m).max(tail)
    }

    #[inline(always)]
    fn scale<S: Simd>(s: S, x: &mut [f32], c: f32) {
        let c = s.splat(c);
        for_each_vector(
            x.len(),
            #[inline(always)]
            |i, at| at.store(s, x, i, s.mul(at.load(s, x, i), c)),
        );
    }

    /// out_i ← f(x_i) for every element (x = `out` itself when `x` is None),
    /// returning Σ f(x_i) (16 partial sums; lanes past the end count 0).
    #[inline(always)]
    fn map_and_sum<S: Simd>(
        s: S,
        out: &mut [f32],
        x: Option<&[f32]>,
        f: impl Fn(S::V) -> S::V,
    ) -> f32 {
        let mut sum = s.zero();
        for_each_vector(
            out.len(),
            #[inline(always)]
            |i, at| {
                let e = f(at.load(s, x.unwrap_or(&*out), i));
                at.store(s, out, i, e);
                // A short last chunk is read back: its lanes past the end are 0.
                let e = match at {
                    Lanes::Whole => e,
                    Lanes::Tail => load_at(s, out, i),
                };
                sum = s.add(sum, e);
            },
        );
        s.reduce_add(sum)
    }

    #[inline(always)]
    pub fn scaled_softmax_in_place<S: Simd>(s: S, x: &mut [f32], c: f32) {
        let (m, cv) = (s.splat(max(s, x)), s.splat(c));
        let sum = map_and_sum(
            s,
            x,
            None,
            #[inline(always)]
            |v| exp(s, s.mul(s.sub(v, m), cv)),
        );
        scale(s, x, 1.0 / sum);
    }

    #[inline(always)]
    pub fn cross_entropy_row<S: Simd>(
        s: S,
        dz: &mut [f32],
        z: &[f32],
        target: usize,
        scale_by: f32,
    ) -> f32 {
        let max = max(s, z);
        let m = s.splat(max);
        let sum = map_and_sum(
            s,
            dz,
            Some(z),
            #[inline(always)]
            |v| exp(s, s.sub(v, m)),
        );
        scale(s, dz, scale_by / sum);
        dz[target] -= scale_by;
        max + sum.ln() - z[target]
    }

    #[inline(always)]
    pub fn swiglu_forward<S: Simd>(s: S, act: &mut [f32], gate_up: &[f32], f: usize) {
        for (a, gu) in act.chunks_exact_mut(f).zip(gate_up.chunks_exact(2 * f)) {
            let (g, u) = gu.split_at(f);
            for_each_vector(
                f,
                #[inline(always)]
                |i, at| {
                    let gv = at.load(s, g, i);
                    let silu = s.mul(gv, sigmoid(s, gv));
                    at.store(s, a, i, s.mul(silu, at.load(s, u, i)));
                },
            );
        }
    }

    #[inline(always)]
    pub fn swiglu_backward<S: Simd>(
        s: S,
        dgate_up: &mut [f32],
        dact: &[f32],
        gate_up: &[f32],
        f: usize,
    ) {
        let one = s.splat(1.0);
        let rows = dgate_up.chunks_exact_mut(2 * f).zip(dact.chunks_exact(f));
        for ((dgu, da), gu) in rows.zip(gate_up.chunks_exact(2 * f)) {
            let (dg, du) = dgu.split_at_mut(f);
            let (g, u) = gu.split_at(f);
            for_each_vector(
                f,
                #[inline(always)]
                |i, at| {
                    let (gv, uv, dav) = (at.load(s, g, i), at.load(s, u, i), at.load(s, da, i));
                    let sg = sigmoid(s, gv);
                    at.store(s, du, i, s.mul(dav, s.mul(gv, sg)));
                    // σ(1 + g(1 − σ))
                    let dsilu = s.mul(sg, s.mul_add(gv, s.sub(one, sg), one));
                    at.store(s, dg, i, s.mul(s.mul(dav, uv), dsilu));
                },
            );
        }
    }

    /// Sixteen rows at a time: their sums of squares first, then one vector
    /// sqrt and divide for all sixteen r_t (IEEE-exact, as the scalar formula).
    #[inline(always)]
    pub fn rmsnorm<S: Simd>(
        s: S,
        y: &mut [f32],
        inv_rms: &mut [f32],
        x: &[f32],
        gamma: &[f32],
        eps: f32,
    ) {
        let h = gamma.len();
        let blocks = y
            .chunks_mut(16 * h)
            .zip(x.chunks(16 * h))
            .zip(inv_rms.chunks_mut(16));
        for ((y, x), inv_rms) in blocks {
            let mut sums = [0.0f32; 16];
            for (sum, x) in sums.iter_mut().zip(x.chunks_exact(h)) {
                *sum = dot(s, x, x);
            }
            let mean = s.div(load_at(s, &sums, 0), s.splat(h as f32));
            let r = s.div(s.splat(1.0), s.sqrt(s.add(mean, s.splat(eps))));
            store_at(s, inv_rms, 0, r);
            for ((y, x), &r) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(&*inv_rms) {
                let rv = s.splat(r);
                for_each_vector(
                    h,
                    #[inline(always)]
                    |i, at| {
                        let v = s.mul(at.load(s, gamma, i), s.mul(at.load(s, x, i), rv));
                        at.store(s, y, i, v);
                    },
                );
            }
        }
    }

    #[inline(always)]
    pub fn rmsnorm_backward<S: Simd>(
        s: S,
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
            let rv = s.splat(r);
            let mut acc = s.zero();
            for_each_vector(
                h,
                #[inline(always)]
                |i, at| {
                    let xhat = s.mul(at.load(s, x, i), rv);
                    let dyv = at.load(s, dy, i);
                    at.store(s, dgamma, i, s.mul_add(dyv, xhat, at.load(s, dgamma, i)));
                    acc = s.mul_add(s.mul(at.load(s, gamma, i), dyv), xhat, acc);
                },
            );
            let c = s.splat(s.reduce_add(acc) / h as f32);
            for_each_vector(
                h,
                #[inline(always)]
                |i, at| {
                    let g = s.mul(at.load(s, gamma, i), at.load(s, dy, i));
                    let xhat = s.mul(at.load(s, x, i), rv);
                    let d = s.mul(rv, s.neg_mul_add(xhat, c, g));
                    at.store(s, dx, i, s.add(at.load(s, dx, i), d));
                },
            );
        }
    }

    #[inline(always)]
    pub fn adamw<S: Simd>(
        s: S,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        st: AdamWStep,
    ) {
        let (b1, b2) = (s.splat(st.beta1), s.splat(st.beta2));
        let (c1, c2) = (s.splat(st.one_minus_beta1), s.splat(st.one_minus_beta2));
        let (inv_bias1, inv_bias2) = (s.splat(st.inv_bias1), s.splat(st.inv_bias2));
        let (lr, eps) = (s.splat(st.lr), s.splat(st.eps));
        let (decay, gs) = (s.splat(st.decay), s.splat(st.grad_scale));
        for_each_vector(
            p.len(),
            #[inline(always)]
            |i, at| {
                let gv = s.mul(at.load(s, g, i), gs);
                let mv = s.add(s.mul(b1, at.load(s, m, i)), s.mul(c1, gv));
                let vv = s.add(s.mul(b2, at.load(s, v, i)), s.mul(s.mul(c2, gv), gv));
                at.store(s, m, i, mv);
                at.store(s, v, i, vv);
                let pv = at.load(s, p, i);
                let w = s.sub(pv, s.mul(decay, pv));
                let denom = s.add(s.sqrt(s.mul(vv, inv_bias2)), eps);
                let update = s.div(s.mul(lr, s.mul(mv, inv_bias1)), denom);
                at.store(s, p, i, s.sub(w, update));
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::simd::Token;
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
            let (mut da, mut db, mut la) = (vec![0.0; n], vec![0.0; n], [0.0]);
            cross_entropy_rows(&mut da, &mut la, &z, &[target as u32], 0.5);
            let la = la[0];
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

    /// The f32s as bit patterns, so equality is to the bit.
    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// `run(token)` gives the same result at every level this CPU can run
    /// as at the scalar level.
    fn same_at_every_level<T: PartialEq + std::fmt::Debug>(what: &str, run: impl Fn(Token) -> T) {
        let want = run(Token::Scalar(simd::Scalar));
        for token in Token::all() {
            assert_eq!(
                run(token),
                want,
                "{what}: {} differs from scalar",
                token.level()
            );
        }
    }

    #[test]
    fn row_kernels_split_over_threads_give_the_bits_of_one_call() {
        // Enough rows for several pieces of each kernel, the last one short.
        super::super::set_threads(2);
        let (f, rows) = (300, 61);
        let gu = data(rows * 2 * f, 4, 6.0);
        let da = data(rows * f, 5, 1.0);
        let t = simd::active();
        let (mut act, mut want) = (vec![0.0; rows * f], vec![0.0; rows * f]);
        swiglu_forward(&mut act, &gu, f);
        simd_call!(t, lanes::swiglu_forward(&mut want, &gu, f));
        assert_eq!(bits(&act), bits(&want), "swiglu forward");
        let (mut d, mut want) = (vec![0.0; rows * 2 * f], vec![0.0; rows * 2 * f]);
        swiglu_backward(&mut d, &da, &gu, f);
        simd_call!(t, lanes::swiglu_backward(&mut want, &da, &gu, f));
        assert_eq!(bits(&d), bits(&want), "swiglu backward");
        let gamma = data(f, 6, 1.0);
        let (mut y, mut r) = (vec![0.0; rows * f], vec![0.0; rows]);
        let (mut y1, mut r1) = (vec![0.0; rows * f], vec![0.0; rows]);
        rmsnorm(&mut y, &mut r, &da, &gamma, 1e-6);
        simd_call!(t, lanes::rmsnorm(&mut y1, &mut r1, &da, &gamma, 1e-6));
        assert_eq!((bits(&y), bits(&r)), (bits(&y1), bits(&r1)), "rmsnorm");
        let targets: Vec<u32> = (0..rows as u32).map(|i| i * 7 % (2 * f as u32)).collect();
        let (mut dz, mut losses) = (vec![0.0; gu.len()], vec![0.0; rows]);
        cross_entropy_rows(&mut dz, &mut losses, &gu, &targets, 0.5);
        for (i, row) in gu.chunks_exact(2 * f).enumerate() {
            let mut want = vec![0.0; 2 * f];
            let loss = simd_call!(
                t,
                lanes::cross_entropy_row(&mut want, row, targets[i] as usize, 0.5)
            );
            assert_eq!(losses[i].to_bits(), loss.to_bits(), "cross-entropy row {i}");
            assert_eq!(
                bits(&dz[i * 2 * f..(i + 1) * 2 * f]),
                bits(&want),
                "dz row {i}"
            );
        }
    }

    #[test]
    fn every_kernel_gives_the_same_bits_at_every_level() {
        for n in LENS {
            let (a, b) = (data(n, 1, 1.0), data(n, 2, 1.0));
            let rows: Vec<Vec<f32>> = (0..8).map(|k| data(n, 10 + k, 1.0)).collect();
            let four = |first: usize| std::array::from_fn(|i| rows[first + i].as_slice());
            let what = format!("n = {n}");
            same_at_every_level(&what, |t| simd_call!(t, lanes::dot(&a, &b)).to_bits());
            same_at_every_level(&what, |t| {
                bits(&simd_call!(t, lanes::dots_4x4(four(0), four(4))))
            });
            same_at_every_level(&what, |t| {
                simd_call!(t, lanes::sum_of_squares(&a)).to_bits()
            });
            same_at_every_level(&what, |t| {
                let mut y = b.clone();
                simd_call!(t, lanes::axpy(&mut y, 0.37, &a));
                bits(&y)
            });
            let z = data(n, 3, 20.0);
            same_at_every_level(&what, |t| {
                let mut x = z.clone();
                simd_call!(t, lanes::scaled_softmax_in_place(&mut x, 0.25));
                bits(&x)
            });
            same_at_every_level(&what, |t| {
                let mut dz = vec![0.0; n];
                let loss = simd_call!(t, lanes::cross_entropy_row(&mut dz, &z, n / 2, 0.5));
                (loss.to_bits(), bits(&dz))
            });
            let step = AdamWStep {
                grad_scale: 0.5,
                decay: 1e-4,
                ..AdamWStep::new((0.9, 0.95), 1e-8, 1e-3, 3)
            };
            let v0: Vec<f32> = data(n, 12, 0.01).iter().map(|v| v.abs()).collect();
            same_at_every_level(&what, |t| {
                let (mut p, mut m, mut v) = (a.clone(), data(n, 11, 0.1), v0.clone());
                simd_call!(t, lanes::adamw(&mut p, &b, &mut m, &mut v, step));
                (bits(&p), bits(&m), bits(&v))
            });
        }
        for f in [1, 17, 256] {
            let (gu, da) = (data(3 * 2 * f, 4, 6.0), data(3 * f, 5, 1.0));
            same_at_every_level(&format!("swiglu f = {f}"), |t| {
                let (mut act, mut d) = (vec![0.0; 3 * f], vec![0.0; 6 * f]);
                simd_call!(t, lanes::swiglu_forward(&mut act, &gu, f));
                simd_call!(t, lanes::swiglu_backward(&mut d, &da, &gu, f));
                (bits(&act), bits(&d))
            });
        }
        for (rows, h) in [(1, 1), (17, 17), (33, 256)] {
            let (x, g, dy) = (
                data(rows * h, 6, 3.0),
                data(h, 7, 1.0),
                data(rows * h, 8, 1.0),
            );
            same_at_every_level(&format!("rmsnorm {rows}x{h}"), |t| {
                let (mut y, mut r) = (vec![0.0; rows * h], vec![0.0; rows]);
                simd_call!(t, lanes::rmsnorm(&mut y, &mut r, &x, &g, 1e-6));
                let (mut dx, mut dg) = (vec![0.1; rows * h], vec![0.2; h]);
                simd_call!(
                    t,
                    lanes::rmsnorm_backward(&mut dx, &mut dg, &dy, &x, &r, &g)
                );
                (bits(&y), bits(&r), bits(&dx), bits(&dg))
            });
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
