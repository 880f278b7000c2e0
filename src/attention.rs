//! Causal multi-query / grouped-query attention over one sequence, and the
//! key/value cache used by generation.
//!
//! Queries, keys and values are read in place from row-major buffers with a
//! row stride, so the same code serves training (q, k, v side by side in the
//! fused projection output) and cached generation (k, v in the cache).

use crate::config::ModelConfig;
use crate::kernels;

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

/// Attention forward for S queries at absolute positions offset..offset+S over
/// L = offset + S keys/values (offset > 0 only with a KV cache).
/// qkv: see [`Qkv`] → probs [H, S, L] (softmax weights; zero where masked),
/// out [S, H·d] (heads side by side).
///   score_i(s, t) = q_{s,i} · k_{t,g(i)} / sqrt(d)   for t ≤ offset + s, g(i) = ⌊i / group⌋
///   P_i(s, ·) = softmax(score_i(s, ·))
///   out_{s,i} = Σ_t P_i(s, t) · v_{t,g(i)}
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
    out[..seq * dims.n_heads * d].fill(0.0);
    for i in 0..dims.n_heads {
        let g = i / dims.group;
        for s in 0..seq {
            let visible = offset + s + 1;
            let q = &qkv.q[s * qkv.q_stride + i * d..][..d];
            let row = &mut probs[(i * seq + s) * keys..][..keys];
            for (t, p) in row[..visible].iter_mut().enumerate() {
                *p = kernels::dot(q, &qkv.k[t * qkv.kv_stride + g * d..][..d]) * scale;
            }
            kernels::softmax_in_place(&mut row[..visible]);
            row[visible..].fill(0.0);
            let o = &mut out[(s * dims.n_heads + i) * d..][..d];
            for (t, &p) in row[..visible].iter().enumerate() {
                kernels::axpy(o, p, &qkv.v[t * qkv.kv_stride + g * d..][..d]);
            }
        }
    }
}

/// Gradients of one sequence's queries, keys and values, written in the same
/// strided layout as [`Qkv`] (`dq` rows of `q_stride`, `dk`/`dv` rows of `kv_stride`).
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

/// Attention backward for a fresh sequence (offset 0, L = S).
/// dout [S, H·d], probs [H, S, S], qkv as in forward → dq, dk, dv (overwritten).
/// With dP_i(s, t) = dout_{s,i} · v_{t,g}:
///   dS_i(s, t) = P_i(s, t) · (dP_i(s, t) − Σ_u P_i(s, u) dP_i(s, u))   (softmax backward)
///   dq_{s,i}  = Σ_t dS_i(s, t) · k_{t,g} / sqrt(d)
///   dk_{t,g} += Σ_{i∈g} Σ_s dS_i(s, t) · q_{s,i} / sqrt(d)
///   dv_{t,g} += Σ_{i∈g} Σ_s P_i(s, t) · dout_{s,i}
/// `dp` is scratch of at least S values.
pub fn attention_backward(
    grad: QkvGrad<'_>,
    dp: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    qkv: Qkv<'_>,
    seq: usize,
    dims: AttnDims,
) {
    let d = dims.head_dim;
    let kv_heads = dims.n_heads / dims.group;
    let scale = 1.0 / (d as f32).sqrt();
    for t in 0..seq {
        let row = &mut grad.buf[t * grad.stride..];
        row[..dims.n_heads * d].fill(0.0);
        row[grad.k_col..grad.k_col + kv_heads * d].fill(0.0);
        row[grad.v_col..grad.v_col + kv_heads * d].fill(0.0);
    }
    for i in 0..dims.n_heads {
        let g = i / dims.group;
        for s in 0..seq {
            let visible = s + 1;
            let p = &probs[(i * seq + s) * seq..][..visible];
            let dout_si = &dout[(s * dims.n_heads + i) * d..][..d];
            let dp = &mut dp[..visible];
            for (t, dp) in dp.iter_mut().enumerate() {
                *dp = kernels::dot(dout_si, &qkv.v[t * qkv.kv_stride + g * d..][..d]);
            }
            let p_dot_dp = kernels::dot(p, dp);
            let q_si = &qkv.q[s * qkv.q_stride + i * d..][..d];
            for t in 0..visible {
                // dS(s, t), pre-scaled by 1/sqrt(d) for dq and dk.
                let ds = p[t] * (dp[t] - p_dot_dp) * scale;
                let k_t = &qkv.k[t * qkv.kv_stride + g * d..][..d];
                kernels::axpy(&mut grad.buf[s * grad.stride + i * d..][..d], ds, k_t);
                let dk = &mut grad.buf[t * grad.stride + grad.k_col + g * d..][..d];
                kernels::axpy(dk, ds, q_si);
                let dv = &mut grad.buf[t * grad.stride + grad.v_col + g * d..][..d];
                kernels::axpy(dv, p[t], dout_si);
            }
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
