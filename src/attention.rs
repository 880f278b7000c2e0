//! Causal multi-query / grouped-query attention over one sequence, and the
//! key/value cache used by generation.
//!
//! Queries, keys and values are read in place from row-major buffers with a
//! row stride, so the same code serves training (q, k, v side by side in the
//! fused projection output) and cached generation (k, v in the cache).

use crate::config::ModelConfig;
use crate::kernels::{self, Mat, MatMut, Write};
use crate::layers::{Linear, Rope, RopeDirection, Shape, Weights};
use crate::params::{Grads, LayerRanges};

/// The sizes attention needs.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    /// Query heads, H.
    pub n_heads: usize,
    /// Query heads per key/value head, H / Hkv.
    pub group: usize,
    /// Head size, d.
    pub head_dim: usize,
}

impl AttnDims {
    /// The attention sizes of `config`.
    pub fn new(config: &ModelConfig) -> Self {
        AttnDims {
            n_heads: config.n_heads,
            group: config.group_size(),
            head_dim: config.head_dim,
        }
    }
}

/// Strided row-major views of one sequence's queries, keys and values.
/// Query head i of row s is `q[s·q_stride + i·d ..][..d]`; key/value head g of
/// row t is `k[t·kv_stride + g·d ..][..d]` (likewise `v`).
#[derive(Debug, Clone, Copy)]
pub struct Qkv<'a> {
    /// Queries, already rotated, S rows.
    pub q: &'a [f32],
    /// Row stride of `q`.
    pub q_stride: usize,
    /// Keys, already rotated, L rows.
    pub k: &'a [f32],
    /// Values, L rows.
    pub v: &'a [f32],
    /// Row stride of `k` and `v`.
    pub kv_stride: usize,
}

impl<'a> Qkv<'a> {
    /// Query head i as a [S, d] matrix.
    fn query(&self, i: usize, seq: usize, d: usize) -> Mat<'a> {
        Mat::strided(&self.q[i * d..], seq, d, self.q_stride)
    }

    /// Key head g as a [L, d] matrix.
    fn key(&self, g: usize, keys: usize, d: usize) -> Mat<'a> {
        Mat::strided(&self.k[g * d..], keys, d, self.kv_stride)
    }

    /// Value head g as a [L, d] matrix.
    fn value(&self, g: usize, keys: usize, d: usize) -> Mat<'a> {
        Mat::strided(&self.v[g * d..], keys, d, self.kv_stride)
    }
}

/// Attention forward for S queries at absolute positions offset..offset+S over
/// L = offset + S keys/values (offset > 0 only with a KV cache).
/// qkv: see [`Qkv`] → probs [H, S, L] (softmax weights; zero where masked),
/// out [S, H·d] (heads side by side). For each head i, reading KV head g = ⌊i / group⌋:
///   scores_i = Q_i · K_gᵀ / sqrt(d)                  [S, L]
///   P_i(s, ·) = softmax(scores_i(s, t ≤ offset + s))  (causal)
///   out_i = P_i · V_g                                 [S, d]
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: Qkv<'_>,
    seq: usize,
    offset: usize,
    dims: AttnDims,
) {
    let d = dims.head_dim;
    let keys = offset + seq;
    let scale = 1.0 / (d as f32).sqrt();
    let out_stride = dims.n_heads * d;
    for (i, p) in probs
        .chunks_exact_mut(seq * keys)
        .take(dims.n_heads)
        .enumerate()
    {
        let g = i / dims.group;
        let (k, v) = (qkv.key(g, keys, d), qkv.value(g, keys, d));
        kernels::matmul(
            MatMut::new(p, seq, keys),
            qkv.query(i, seq, d),
            k.t(),
            Write::Overwrite,
        );
        for (s, row) in p.chunks_exact_mut(keys).enumerate() {
            let visible = offset + s + 1;
            kernels::scaled_softmax_in_place(&mut row[..visible], scale);
            row[visible..].fill(0.0);
        }
        let o = MatMut::strided(&mut out[i * d..], seq, d, out_stride);
        kernels::matmul(o, Mat::new(p, seq, keys), v, Write::Overwrite);
    }
}

/// Gradients of one sequence's queries, keys and values, written in the same
/// strided layout as [`Qkv`] (`dq` at column 0, `dk` at `k_col`, `dv` at
/// `v_col`, every row `stride` apart).
pub struct QkvGrad<'a> {
    /// The buffer holding dq, dk and dv.
    pub buf: &'a mut [f32],
    /// Row stride of the buffer.
    pub stride: usize,
    /// Column where dk begins (dq begins at 0).
    pub k_col: usize,
    /// Column where dv begins.
    pub v_col: usize,
}

impl QkvGrad<'_> {
    /// Columns col..col+d of every row, as a [S, d] matrix.
    fn head(&mut self, col: usize, seq: usize, d: usize) -> MatMut<'_> {
        MatMut::strided(&mut self.buf[col..], seq, d, self.stride)
    }
}

/// Attention backward for a fresh sequence (offset 0, L = S).
/// dout [S, H·d], probs [H, S, S], qkv as in forward → dq, dk, dv (overwritten).
/// `dp` is scratch of S·S values. For each head i reading KV head g:
///   dP_i = dout_i · V_gᵀ                                   [S, S]
///   dS_i = P_i ⊙ (dP_i − rowsum(P_i ⊙ dP_i)) / sqrt(d)     (softmax backward, scale folded in)
///   dq_i = dS_i · K_g;   dk_g += dS_iᵀ · Q_i;   dv_g += P_iᵀ · dout_i
pub fn attention_backward(
    mut grad: QkvGrad<'_>,
    dp: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    qkv: Qkv<'_>,
    seq: usize,
    dims: AttnDims,
) {
    let d = dims.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let dout_stride = dims.n_heads * d;
    let dp = &mut dp[..seq * seq];
    for (i, p) in probs.chunks_exact(seq * seq).take(dims.n_heads).enumerate() {
        let g = i / dims.group;
        // The first query head of a group overwrites dk_g and dv_g; the others add.
        let kv_write = if i % dims.group == 0 {
            Write::Overwrite
        } else {
            Write::Accumulate
        };
        let (k, v) = (qkv.key(g, seq, d), qkv.value(g, seq, d));
        let p = Mat::new(p, seq, seq);
        let dout_i = Mat::strided(&dout[i * d..], seq, d, dout_stride);
        kernels::matmul(MatMut::new(dp, seq, seq), dout_i, v.t(), Write::Overwrite);
        for (dp_row, p_row) in dp
            .chunks_exact_mut(seq)
            .zip(probs[i * seq * seq..].chunks_exact(seq))
        {
            let p_dot_dp = kernels::dot(p_row, dp_row);
            for (ds, &p) in dp_row.iter_mut().zip(p_row) {
                *ds = p * (*ds - p_dot_dp) * scale;
            }
        }
        let ds = Mat::new(dp, seq, seq);
        kernels::matmul(grad.head(i * d, seq, d), ds, k, Write::Overwrite);
        let (k_col, v_col) = (grad.k_col + g * d, grad.v_col + g * d);
        kernels::matmul(
            grad.head(k_col, seq, d),
            ds.t(),
            qkv.query(i, seq, d),
            kv_write,
        );
        kernels::matmul(grad.head(v_col, seq, d), p.t(), dout_i, kv_write);
    }
}

impl AttnDims {
    /// Width of the queries of one token, H·d.
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the keys (or values) of one token, Hkv·d.
    pub fn kv_width(&self) -> usize {
        self.n_heads / self.group * self.head_dim
    }

    /// Width of one row of the fused projection output q|k|v, (H + 2·Hkv)·d.
    pub fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}

impl<'a> Qkv<'a> {
    /// The view of S rows of the fused projection output q|k|v [S, (H + 2·Hkv)·d].
    pub fn fused(rows: &'a [f32], dims: AttnDims) -> Self {
        let (width, k_col) = (dims.qkv_width(), dims.q_width());
        Qkv {
            q: rows,
            q_stride: width,
            k: &rows[k_col..],
            v: &rows[k_col + dims.kv_width()..],
            kv_stride: width,
        }
    }
}

impl<'a> QkvGrad<'a> {
    /// The gradient of S rows of q|k|v, laid out like [`Qkv::fused`].
    pub fn fused(rows: &'a mut [f32], dims: AttnDims) -> Self {
        QkvGrad {
            buf: rows,
            stride: dims.qkv_width(),
            k_col: dims.q_width(),
            v_col: dims.q_width() + dims.kv_width(),
        }
    }
}

/// Where attention finds its keys and values.
pub enum KvSource<'c> {
    /// Keys and values of the current batch only (training, full forward).
    Batch,
    /// One layer's KV cache for one sequence, holding `offset` earlier positions.
    Cache {
        /// Keys [capacity, Hkv·d].
        keys: &'c mut [f32],
        /// Values [capacity, Hkv·d].
        values: &'c mut [f32],
        /// Positions already cached.
        offset: usize,
    },
}

impl KvSource<'_> {
    /// Position of the first new token.
    pub fn offset(&self) -> usize {
        match self {
            KvSource::Batch => 0,
            KvSource::Cache { offset, .. } => *offset,
        }
    }

    /// The queries, keys and values one sequence's attention reads, from S rows
    /// of q|k|v: the rows themselves, or (with a cache) the rows' keys and
    /// values appended to the cache first, then all L = offset + S of them.
    fn view<'s>(&'s mut self, rows: &'s [f32], dims: AttnDims) -> Qkv<'s> {
        let KvSource::Cache {
            keys,
            values,
            offset,
        } = self
        else {
            return Qkv::fused(rows, dims);
        };
        let (k_col, kv_dim) = (dims.q_width(), dims.kv_width());
        let width = dims.qkv_width();
        for (s, row) in rows.chunks_exact(width).enumerate() {
            let at = (*offset + s) * kv_dim;
            keys[at..at + kv_dim].copy_from_slice(&row[k_col..k_col + kv_dim]);
            values[at..at + kv_dim].copy_from_slice(&row[k_col + kv_dim..]);
        }
        let filled = (*offset + rows.len() / width) * kv_dim;
        Qkv {
            q: rows,
            q_stride: width,
            k: &keys[..filled],
            v: &values[..filled],
            kv_stride: kv_dim,
        }
    }
}

/// What the attention sublayer saves for backward, for T tokens.
#[derive(Debug, Default, Clone)]
pub struct AttnActs {
    /// Its input, RMSNorm_attn(x) [T, h].
    pub xn: Vec<f32>,
    /// Fused projection output q|k|v [T, (H + 2·Hkv)·d], q and k rotated.
    pub qkv: Vec<f32>,
    /// Attention weights [B, H, S, L].
    pub probs: Vec<f32>,
    /// The heads' outputs side by side, before o_proj [T, H·d].
    pub heads: Vec<f32>,
}

impl AttnActs {
    /// Sizes the buffers for `shape` attending over `keys` positions.
    pub fn plan(&mut self, shape: Shape, keys: usize, hidden: usize, dims: AttnDims) {
        let tokens = shape.tokens();
        self.xn.resize(tokens * hidden, 0.0);
        self.qkv.resize(tokens * dims.qkv_width(), 0.0);
        self.probs.resize(tokens * dims.n_heads * keys, 0.0);
        self.heads.resize(tokens * dims.q_width(), 0.0);
    }
}

/// Scratch of the attention backward.
#[derive(Debug, Default, Clone)]
pub struct AttnScratch {
    /// dL/d(the heads' outputs before o_proj) [T, H·d].
    dheads: Vec<f32>,
    /// dL/d(q|k|v) [T, (H + 2·Hkv)·d].
    dqkv: Vec<f32>,
    /// dL/dP, then dL/d(scores), of one head [S, S].
    dprobs: Vec<f32>,
}

impl AttnScratch {
    /// Sizes the buffers for `shape`.
    pub fn plan(&mut self, shape: Shape, dims: AttnDims) {
        let tokens = shape.tokens();
        self.dheads.resize(tokens * dims.q_width(), 0.0);
        self.dqkv.resize(tokens * dims.qkv_width(), 0.0);
        self.dprobs.resize(shape.seq * shape.seq, 0.0);
    }
}

/// One layer's attention: `attn.{q,k,v}_proj` (fused) and `attn.o_proj`,
/// with the RoPE tables.
#[derive(Debug, Clone)]
pub struct Attention<'a> {
    /// `q_proj`, `k_proj`, `v_proj` stacked: [(H + 2·Hkv)·d, h].
    pub qkv_proj: Linear<'a>,
    /// `o_proj` [h, H·d].
    pub o_proj: Linear<'a>,
    /// Rotary-embedding tables.
    pub rope: &'a Rope,
    /// Head counts and size.
    pub dims: AttnDims,
}

impl<'a> Attention<'a> {
    /// The attention of the layer at `ranges`.
    pub fn new(
        weights: Weights<'a>,
        ranges: &LayerRanges,
        config: &ModelConfig,
        rope: &'a Rope,
    ) -> Self {
        let dims = AttnDims::new(config);
        let h = config.hidden_dim;
        Attention {
            qkv_proj: Linear::new(weights, &ranges.qkv, dims.qkv_width(), h),
            o_proj: Linear::new(weights, &ranges.o_proj, h, dims.q_width()),
            rope,
            dims,
        }
    }

    /// x [T, h] += Attn(acts.xn): q|k|v = xn·W_qkvᵀ, RoPE on q and k, causal
    /// attention per sequence (over `kv`), then x += out·W_oᵀ.
    pub fn forward(&self, x: &mut [f32], acts: &mut AttnActs, shape: Shape, mut kv: KvSource<'_>) {
        let (dims, seq, tokens) = (self.dims, shape.seq, shape.tokens());
        let (width, q_width) = (dims.qkv_width(), dims.q_width());
        let qkv = &mut acts.qkv[..tokens * width];
        self.qkv_proj
            .forward(qkv, &acts.xn[..x.len()], Write::Overwrite);
        let offset = kv.offset();
        self.rotate(qkv, seq, offset, RopeDirection::Forward);
        let per_seq_probs = dims.n_heads * seq * (offset + seq);
        for b in 0..shape.batch {
            let view = kv.view(&qkv[b * seq * width..(b + 1) * seq * width], dims);
            let out = &mut acts.heads[b * seq * q_width..(b + 1) * seq * q_width];
            let probs = &mut acts.probs[b * per_seq_probs..(b + 1) * per_seq_probs];
            attention_forward(out, probs, view, seq, offset, dims);
        }
        // x += heads · W_oᵀ (the residual)
        self.o_proj
            .forward(x, &acts.heads[..tokens * q_width], Write::Accumulate);
    }

    /// Backward from dout [T, h] = dL/d(the sublayer's output): dxn [T, h] =
    /// dL/d(acts.xn) (overwritten), dW_o then dW_qkv into `grads`. Fresh
    /// sequences only (offset 0): training does not use a cache.
    pub fn backward(
        &self,
        dxn: &mut [f32],
        dout: &[f32],
        acts: &AttnActs,
        scratch: &mut AttnScratch,
        grads: &mut Grads<'_>,
        shape: Shape,
    ) {
        let (dims, seq, tokens) = (self.dims, shape.seq, shape.tokens());
        let (width, q_width) = (dims.qkv_width(), dims.q_width());
        let dheads = &mut scratch.dheads[..tokens * q_width];
        self.o_proj.backward(
            dheads,
            dout,
            &acts.heads[..tokens * q_width],
            Write::Overwrite,
            grads,
        );
        let dqkv = &mut scratch.dqkv[..tokens * width];
        let per_seq_probs = dims.n_heads * seq * seq;
        for b in 0..shape.batch {
            let view = Qkv::fused(&acts.qkv[b * seq * width..(b + 1) * seq * width], dims);
            let grad = QkvGrad::fused(&mut dqkv[b * seq * width..(b + 1) * seq * width], dims);
            let probs = &acts.probs[b * per_seq_probs..(b + 1) * per_seq_probs];
            let dheads_b = &dheads[b * seq * q_width..(b + 1) * seq * q_width];
            attention_backward(grad, &mut scratch.dprobs, dheads_b, probs, view, seq, dims);
        }
        // RoPE backward: the inverse rotation Rᵀ of dq and dk.
        self.rotate(dqkv, seq, 0, RopeDirection::Backward);
        let xn = &acts.xn[..dxn.len()];
        self.qkv_proj
            .backward(dxn, dqkv, xn, Write::Overwrite, grads);
    }

    /// Rotates the q and k heads of every row of q|k|v [T, (H + 2·Hkv)·d] (not
    /// v): row t is at position offset + t mod S.
    fn rotate(&self, qkv: &mut [f32], seq: usize, offset: usize, direction: RopeDirection) {
        let qk_width = self.dims.q_width() + self.dims.kv_width();
        for (t, row) in qkv.chunks_exact_mut(self.dims.qkv_width()).enumerate() {
            self.rope
                .rotate(&mut row[..qk_width], offset + t % seq, direction);
        }
    }
}

/// Keys and values of every position seen so far, for every layer: each new
/// token costs one position instead of a full recompute.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys [capacity, Hkv·d] (rotated).
    pub(crate) keys: Vec<Vec<f32>>,
    /// Per layer: values [capacity, Hkv·d].
    pub(crate) values: Vec<Vec<f32>>,
    /// Positions filled.
    pub(crate) len: usize,
    /// Positions the cache can hold (≤ max_seq_len).
    pub(crate) capacity: usize,
}

impl KvCache {
    /// An empty cache for one sequence of up to `capacity` positions.
    pub fn new(config: &ModelConfig, capacity: usize) -> Self {
        let capacity = capacity.min(config.max_seq_len);
        let width = config.n_kv_heads * config.head_dim;
        KvCache {
            keys: vec![vec![0.0; capacity * width]; config.n_layers],
            values: vec![vec![0.0; capacity * width]; config.n_layers],
            len: 0,
            capacity,
        }
    }

    /// Forgets every cached position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
