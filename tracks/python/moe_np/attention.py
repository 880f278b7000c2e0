"""Causal grouped-query attention with RoPE (CONTRACT §3), its backward, and the
KV cache of generation.

Heads are grouped: query head i reads key/value head ⌊i / G⌋, G = H / Hkv. The
arrays keep that grouping as an axis, [B, Hkv, G, S, d], so one batched matrix
product serves every head of a group without copying the keys.
"""

import math

import numpy as np

from .layers import linear_backward, linear_forward, rope_backward, rope_forward, softmax_forward


class KvCache:
    """Rotated keys and values of the positions seen so far, for one sequence batch.

    keys/values: one [B, capacity, Hkv, d] pair per layer; `length` positions filled.
    """

    def __init__(self, config, batch, capacity):
        shape = (batch, capacity, config.n_kv_heads, config.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self.capacity, self.length = capacity, 0

    def append(self, layer, k, v):
        """Stores k, v [B, S, Hkv, d] after the cached positions; returns all keys and values."""
        start, end = self.length, self.length + k.shape[1]
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


def attention_forward(x, w, config, cos, sin, offset=0, cache=None, layer=0):
    """x [B, S, h] → y [B, S, h], saved.

    q = x·Wqᵀ [B,S,H,d], k = x·Wkᵀ, v = x·Wvᵀ [B,S,Hkv,d]; RoPE on q, k at positions offset + s;
    scores = q·kᵀ/√d with keys after the query masked; P = softmax(scores); o = P·v (head-major);
    y = o·Woᵀ. With a cache, the new k, v are appended and the queries see every cached key.
    """
    B, S, _ = x.shape
    H, Hkv, d = config.n_heads, config.n_kv_heads, config.head_dim
    G = H // Hkv
    q = linear_forward(x, w["q_proj"]).reshape(B, S, H, d)
    k = linear_forward(x, w["k_proj"]).reshape(B, S, Hkv, d)
    v = linear_forward(x, w["v_proj"]).reshape(B, S, Hkv, d)
    rc, rs = cos[offset:offset + S], sin[offset:offset + S]
    q, k = rope_forward(q, rc, rs), rope_forward(k, rc, rs)
    keys, values = cache.append(layer, k, v) if cache is not None else (k, v)
    # [B, Hkv, G, S, d] queries against [B, Hkv, 1, K, d] keys → scores [B, Hkv, G, S, K].
    qg = q.reshape(B, S, Hkv, G, d).transpose(0, 2, 3, 1, 4)
    kg = keys.transpose(0, 2, 1, 3)[:, :, None]
    vg = values.transpose(0, 2, 1, 3)[:, :, None]
    scores = (qg @ kg.swapaxes(-1, -2)) * np.float32(1.0 / math.sqrt(d))
    K = keys.shape[1]
    future = np.arange(K)[None, :] > (offset + np.arange(S))[:, None]
    scores[..., future] = -np.inf
    p = softmax_forward(scores)
    og = p @ vg
    o = og.transpose(0, 3, 1, 2, 4).reshape(B, S, H * d)
    y = linear_forward(o, w["o_proj"])
    return y, (x, qg, kg, vg, p, o, rc, rs)


def attention_backward(dy, saved, w, config):
    """dy [B, S, h] → dx [B, S, h], {name: dW} (no cache: training starts at position 0).

    dWo = dyᵀ·o;  do = dy·Wo;  dP = do·vᵀ;  dv = Σ_G Pᵀ·do;
    dscores = P ⊙ (dP − Σ_t P·dP) / √d;  dq = dscores·k;  dk = Σ_G dscoresᵀ·q;
    RoPE backward (inverse rotation) on dq, dk;  dW{q,k,v} = d{q,k,v}ᵀ·x;  dx = Σ d{q,k,v}·W{q,k,v}.
    """
    x, qg, kg, vg, p, o, rc, rs = saved
    B, S, _ = x.shape
    H, Hkv, d = config.n_heads, config.n_kv_heads, config.head_dim
    G = H // Hkv
    grads = {}
    do, grads["o_proj"] = linear_backward(dy, o, w["o_proj"])
    dog = do.reshape(B, S, Hkv, G, d).transpose(0, 2, 3, 1, 4)
    dp = dog @ vg.swapaxes(-1, -2)
    dv = np.sum(p.swapaxes(-1, -2) @ dog, axis=2)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True)) * np.float32(1.0 / math.sqrt(d))
    dq = (ds @ kg).transpose(0, 3, 1, 2, 4).reshape(B, S, H, d)
    dk = np.sum(ds.swapaxes(-1, -2) @ qg, axis=2)
    dq = rope_backward(dq, rc, rs).reshape(B, S, H * d)
    dk = rope_backward(dk.transpose(0, 2, 1, 3), rc, rs).reshape(B, S, Hkv * d)
    dv = dv.transpose(0, 2, 1, 3).reshape(B, S, Hkv * d)
    dx = np.zeros_like(x)
    for name, dz in (("q_proj", dq), ("k_proj", dk), ("v_proj", dv)):
        dxi, grads[name] = linear_backward(dz, x, w[name])
        dx += dxi
    return dx, grads
