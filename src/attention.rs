//! Causal multi-query / grouped-query attention over one sequence, and the
//! key/value cache used by generation.
//!
//! Queries, keys and values are read in place from row-major buffers with a
//! row stride, so the same code serves training (q, k, v side by side in the
//! fused projection output) and cached generation (k, v in the cache).

use crate::config::ModelConfig;
use crate::kernels::{self, Mat, MatMut, Write};

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

    /// Forgets every position (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}
