//! The simple layers: embedding, RMSNorm, linear, RoPE, as `*_forward` /
//! `*_backward` functions and as typed views ([`Embedding`], [`RmsNorm`],
//! [`Linear`]) into the flat parameter buffer.
//!
//! Each is a `*_forward` / `*_backward` pair over flat row-major slices, with
//! shapes in its first comment. T is the number of tokens (B·S), h the width.
//! Backward functions *overwrite* parameter gradients (each parameter is used
//! once per step) and *add* input gradients into the residual stream.

use crate::config::ModelConfig;
use std::ops::Range;

use crate::kernels::{self, Mat, MatMut, PackedWeight, Write};
use crate::params::Grads;

/// Embedding lookup.
/// x [T, h] ← table [V, h] rows `ids` [T]. Ids are validated by the caller.
pub fn embedding_forward(x: &mut [f32], table: &[f32], ids: &[u32], h: usize) {
    for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * h..(id + 1) * h]);
    }
}

/// Embedding backward: a scatter-add, dtable[id_t] += dx_t.
/// dtable [V, h] (overwritten: zeroed first), dx [T, h], ids [T].
pub fn embedding_backward(dtable: &mut [f32], dx: &[f32], ids: &[u32], h: usize) {
    dtable.fill(0.0);
    for (row, &id) in dx.chunks_exact(h).zip(ids) {
        let id = id as usize;
        kernels::add_assign(&mut dtable[id * h..(id + 1) * h], row);
    }
}

/// RMSNorm forward, row by row.
/// x [T, h], gamma [h] → y [T, h], inv_rms [T] (saved for backward).
/// r_t = 1 / sqrt(mean_j x_tj² + ε);  y_tj = γ_j · x_tj · r_t   (ε = `rms_norm_eps`)
pub fn rmsnorm_forward(y: &mut [f32], inv_rms: &mut [f32], x: &[f32], gamma: &[f32], eps: f32) {
    kernels::rmsnorm(y, inv_rms, x, gamma, eps);
}

/// RMSNorm backward.
/// dy [T, h], x [T, h], inv_rms [T], gamma [h] → dx [T, h] (added), dgamma [h] (overwritten).
/// With x̂ = x·r and g = γ ⊙ dy:
///   dγ_j = Σ_t dy_tj · x̂_tj
///   dx_t += r_t · (g_t − x̂_t · (g_t · x̂_t) / h)
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dy: &[f32],
    x: &[f32],
    inv_rms: &[f32],
    gamma: &[f32],
) {
    dgamma.fill(0.0);
    kernels::rmsnorm_backward(dx, dgamma, dy, x, inv_rms, gamma);
}

/// Where a linear layer reads its weight W [out, in]: the flat parameters,
/// or a copy packed once for products x·Wᵀ (see [`PackedWeights`]).
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    /// W row-major, straight from the parameters.
    Plain(&'a [f32]),
    /// W packed by `kernels::pack_weight`.
    Packed(PackedWeight<'a>),
}

/// Packed copies of a model's linear weights, for models that run many
/// forwards between weight changes (inference, evaluation, generation):
/// packing is then paid once instead of in every product. The products are
/// the same to the bit either way.
#[derive(Debug, Clone, Default)]
pub struct PackedWeights {
    data: Vec<f32>,
    /// (first parameter index, packed offset, out, in), sorted by parameter index.
    index: Vec<(usize, usize, usize, usize)>,
    /// True when `data` matches the current parameters.
    valid: bool,
}

impl PackedWeights {
    /// Packs every weight in `weights` (parameter range, out, in) from `params`.
    /// Reuses its memory when the set of weights is unchanged.
    pub fn build(&mut self, params: &[f32], weights: &[(Range<usize>, usize, usize)]) {
        let mut offset = 0;
        self.index.clear();
        for (range, out, inp) in weights {
            self.index.push((range.start, offset, *out, *inp));
            offset += kernels::packed_weight_len(*out, *inp);
        }
        self.index.sort_unstable();
        if self.data.len() != offset {
            // Every float is written below: packing covers its whole panels.
            self.data = kernels::zeroed(offset);
        }
        for &(start, at, out, inp) in &self.index {
            let len = kernels::packed_weight_len(out, inp);
            kernels::pack_weight(
                &mut self.data[at..at + len],
                &params[start..start + out * inp],
                out,
                inp,
            );
        }
        self.valid = true;
    }

    /// True when the packed copies match the parameters.
    pub fn is_valid(&self) -> bool {
        self.valid
    }

    /// Marks the copies stale (the parameters changed).
    pub fn invalidate(&mut self) {
        self.valid = false;
    }

    /// The packed copy of the weight starting at parameter index `start`.
    fn get(&self, start: usize) -> Option<PackedWeight<'_>> {
        let i = self.index.binary_search_by_key(&start, |e| e.0).ok()?;
        let (_, at, out, inp) = self.index[i];
        let len = kernels::packed_weight_len(out, inp);
        Some(PackedWeight::new(&self.data[at..at + len], out, inp))
    }
}

/// The parameters a forward pass reads, with packed weights when available.
#[derive(Debug, Clone, Copy)]
pub struct Weights<'a> {
    /// All parameters, flat.
    pub params: &'a [f32],
    /// Valid packed copies, if the caller wants them used.
    pub packed: Option<&'a PackedWeights>,
}

impl<'a> Weights<'a> {
    /// The weight occupying `range` of the parameters.
    pub fn linear(&self, range: Range<usize>) -> Weight<'a> {
        match self.packed.and_then(|p| p.get(range.start)) {
            Some(packed) => Weight::Packed(packed),
            None => Weight::Plain(&self.params[range]),
        }
    }

    /// A parameter slice (norm gains and weights read as they are).
    pub fn raw(&self, range: Range<usize>) -> &'a [f32] {
        &self.params[range]
    }
}

/// Precomputed rotary-embedding angles for every position up to max_seq_len.
#[derive(Debug, Clone)]
pub struct Rope {
    /// cos θ for [position, pair] as [max_seq_len, d/2].
    cos: Vec<f32>,
    /// sin θ, same layout.
    sin: Vec<f32>,
    /// d/2.
    pairs: usize,
}

impl Rope {
    /// Tables for `config` (CONTRACT §3):
    /// b' = base if α ≤ 1 else base·α^(d/(d−2));  f_i = b'^(−2i/d);  θ = p·f_i.
    /// Angles are computed in f64 and rounded once to f32.
    pub fn new(config: &ModelConfig) -> Self {
        let d = config.head_dim as f64;
        let base = config.effective_rope_base();
        let pairs = config.head_dim / 2;
        let len = config.max_seq_len * pairs;
        let (mut cos, mut sin) = (Vec::with_capacity(len), Vec::with_capacity(len));
        for p in 0..config.max_seq_len {
            for i in 0..pairs {
                let theta = p as f64 * base.powf(-2.0 * i as f64 / d);
                cos.push(theta.cos() as f32);
                sin.push(theta.sin() as f32);
            }
        }
        Rope { cos, sin, pairs }
    }

    /// Rotates every head vector of one token at `position`, in place.
    /// heads [n_heads·d]. Interleaved pairs (2i, 2i+1):
    ///   forward  (a, b) → (a·cosθ − b·sinθ, a·sinθ + b·cosθ)
    ///   backward (a, b) → (a·cosθ + b·sinθ, −a·sinθ + b·cosθ)   (the inverse rotation, Rᵀ)
    pub fn rotate(&self, heads: &mut [f32], position: usize, direction: RopeDirection) {
        let start = position * self.pairs;
        let cos = &self.cos[start..start + self.pairs];
        let sin_sign = match direction {
            RopeDirection::Forward => 1.0,
            RopeDirection::Backward => -1.0,
        };
        let sin = &self.sin[start..start + self.pairs];
        for head in heads.chunks_exact_mut(2 * self.pairs) {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (a, b) = (pair[0], pair[1]);
                let s = sin_sign * s;
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    }
}

/// Which way [`Rope::rotate`] turns: the forward rotation or its inverse
/// (which is also its gradient, since rotations are orthogonal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeDirection {
    /// Rotate by +θ.
    Forward,
    /// Rotate by −θ.
    Backward,
}

/// The shape of a forward pass: B sequences of S new tokens each.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// B.
    pub batch: usize,
    /// S.
    pub seq: usize,
}

impl Shape {
    /// T = B·S.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// One named tensor of the flat parameter buffer: its values, and its range
/// there (its gradient sits at the same range of the gradient buffer).
#[derive(Debug, Clone)]
pub struct Param<'a> {
    /// The tensor's values, borrowed from the parameters.
    pub values: &'a [f32],
    /// Where it lives in the flat buffers.
    pub range: Range<usize>,
}

impl<'a> Param<'a> {
    /// The tensor at `range` of `weights`.
    pub fn new(weights: Weights<'a>, range: &Range<usize>) -> Self {
        Param {
            values: weights.raw(range.clone()),
            range: range.clone(),
        }
    }
}

/// The embedding table `embed.weight` [V, h].
#[derive(Debug, Clone)]
pub struct Embedding<'a> {
    /// `embed.weight` [V, h].
    pub weight: Param<'a>,
    /// h.
    pub hidden: usize,
}

impl Embedding<'_> {
    /// x [T, h] ← rows `ids` [T] of the table.
    pub fn forward(&self, x: &mut [f32], ids: &[u32]) {
        embedding_forward(x, self.weight.values, ids, self.hidden);
    }

    /// d(table) [V, h] = Σ_t e_{id_t} ⊗ dx_t, from dx [T, h].
    pub fn backward(&self, dx: &[f32], ids: &[u32], grads: &mut Grads<'_>) {
        grads.write(&self.weight.range, |dtable| {
            embedding_backward(dtable, dx, ids, self.hidden);
        });
    }
}

/// An RMSNorm with its gain (`*_norm.weight` [h]).
#[derive(Debug, Clone)]
pub struct RmsNorm<'a> {
    /// The gain γ [h].
    pub weight: Param<'a>,
    /// ε under the square root (`rms_norm_eps`).
    pub eps: f32,
}

impl RmsNorm<'_> {
    /// y [T, h] = γ ⊙ x·r, inv_rms r [T] saved (see [`rmsnorm_forward`]).
    pub fn forward(&self, y: &mut [f32], inv_rms: &mut [f32], x: &[f32]) {
        rmsnorm_forward(y, inv_rms, x, self.weight.values, self.eps);
    }

    /// dx [T, h] += dL/dx from dy [T, h]; dγ into `grads` (see [`rmsnorm_backward`]).
    pub fn backward(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        x: &[f32],
        inv_rms: &[f32],
        grads: &mut Grads<'_>,
    ) {
        grads.write(&self.weight.range, |dgamma| {
            rmsnorm_backward(dx, dgamma, dy, x, inv_rms, self.weight.values);
        });
    }
}

/// A linear layer y = x·Wᵀ with W [out, in] (`*_proj.weight`, `lm_head.weight`, …).
#[derive(Debug, Clone)]
pub struct Linear<'a> {
    /// W as the forward reads it (the packed copy when the model has one).
    weight: Weight<'a>,
    /// W as stored, read by backward; dW goes to the same range of the gradients.
    param: Param<'a>,
    /// in.
    d_in: usize,
    /// out.
    d_out: usize,
}

impl<'a> Linear<'a> {
    /// The [out, in] weight at `range` of `weights`.
    pub fn new(weights: Weights<'a>, range: &Range<usize>, d_out: usize, d_in: usize) -> Self {
        Linear {
            weight: weights.linear(range.clone()),
            param: Param::new(weights, range),
            d_in,
            d_out,
        }
    }

    /// Where W lives in the flat buffers.
    pub fn range(&self) -> &Range<usize> {
        &self.param.range
    }

    /// y [T, out] (=|+=) x [T, in] · Wᵀ  (PyTorch's convention: W stored [out, in]).
    pub fn forward(&self, y: &mut [f32], x: &[f32], write: Write) {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let tokens = x.len() / d_in;
        let (y, x) = (MatMut::new(y, tokens, d_out), Mat::new(x, tokens, d_in));
        match self.weight {
            Weight::Plain(w) => kernels::matmul(y, x, Mat::new(w, d_out, d_in).t(), write),
            Weight::Packed(w) => kernels::matmul_packed(y, x, w, write),
        }
    }

    /// dW [out, in] = dyᵀ·x into `grads` (counted; see [`Grads::outer`]);
    /// dx [T, in] (=|+=) dy·W, as `dx_write` says. dy [T, out], x [T, in].
    pub fn backward(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        x: &[f32],
        dx_write: Write,
        grads: &mut Grads<'_>,
    ) {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let tokens = x.len() / d_in;
        //   dW [out, in] = dyᵀ · x
        grads.outer(&self.param.range, dy, x, d_out, d_in);
        //   dx [T, in] = dy · W
        kernels::matmul(
            MatMut::new(dx, tokens, d_in),
            Mat::new(dy, tokens, d_out),
            Mat::new(self.param.values, d_out, d_in),
            dx_write,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_forward_normalises() {
        let x = [3.0, 4.0];
        let (mut y, mut r) = ([0.0; 2], [0.0; 1]);
        rmsnorm_forward(&mut y, &mut r, &x, &[1.0, 2.0], 0.5);
        let rms = (12.5f32 + 0.5).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_backward_inverts_forward_and_position_zero_is_identity() {
        let config = ModelConfig {
            rope_alpha: 2.0,
            ..ModelConfig::tiny()
        };
        let rope = Rope::new(&config);
        let orig: Vec<f32> = (0..32).map(|i| i as f32 * 0.1 - 1.0).collect();
        let mut x = orig.clone();
        rope.rotate(&mut x, 0, RopeDirection::Forward);
        assert_eq!(x, orig);
        rope.rotate(&mut x, 17, RopeDirection::Forward);
        assert!(x.iter().zip(&orig).any(|(a, b)| (a - b).abs() > 1e-3));
        rope.rotate(&mut x, 17, RopeDirection::Backward);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn ntk_scaling_lowers_the_frequencies() {
        let plain = Rope::new(&ModelConfig::tiny());
        let ntk = Rope::new(&ModelConfig {
            rope_alpha: 8.0,
            ..ModelConfig::tiny()
        });
        // Pair 0 always has frequency 1; higher pairs turn more slowly under NTK.
        let p = 5 * plain.pairs;
        assert_eq!(plain.cos[p], ntk.cos[p]);
        assert!(ntk.cos[p + 3] > plain.cos[p + 3]);
    }
}
