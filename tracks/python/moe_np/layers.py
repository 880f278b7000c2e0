"""The building blocks, each a forward/backward pair: embedding, RMSNorm, linear,
RoPE, softmax, SwiGLU and cross-entropy. A forward returns its output and what its
backward needs; a backward returns the input gradient (and weight gradients)."""

import numpy as np


def embedding_forward(table, ids):
    """table [V, h], ids [B, S] → x [B, S, h];  x_bs = table[ids_bs]."""
    return table[ids]


def embedding_backward(dx, ids, vocab):
    """dx [B, S, h] → dtable [V, h];  scatter-add: dtable[v] = Σ_{ids_bs = v} dx_bs."""
    dtable = np.zeros((vocab, dx.shape[-1]), dx.dtype)
    np.add.at(dtable, ids.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    return dtable


def rmsnorm_forward(x, gamma, eps):
    """x [..., h], gamma [h] → y [..., h].

    r = 1 / sqrt(mean_j x_j² + ε);  x̂ = x·r;  y = γ ⊙ x̂.
    """
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    xhat = x * r
    return gamma * xhat, (xhat, r, gamma)


def rmsnorm_backward(dy, saved):
    """dy [..., h] → dx [..., h], dgamma [h].

    dγ_j = Σ dy_j·x̂_j;  with g = γ ⊙ dy:  dx = r·(g − x̂·mean_j(g_j·x̂_j)).
    """
    xhat, r, gamma = saved
    dgamma = np.sum((dy * xhat).reshape(-1, dy.shape[-1]), axis=0)
    g = gamma * dy
    dx = r * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    return dx, dgamma


def linear_forward(x, w):
    """x [..., in], W [out, in] → y [..., out];  y = x·Wᵀ (PyTorch convention)."""
    return x @ w.T


def linear_backward(dy, x, w):
    """dy [..., out] → dx [..., in] = dy·W,  dW [out, in] = dyᵀ·x (summed over rows)."""
    dx = dy @ w
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return dx, dw


def rope_tables(config):
    """cos θ, sin θ [max_seq_len, d/2] (float64 angles, rounded once to float32).

    b' = base if α ≤ 1 else base·α^(d/(d−2));  f_i = b'^(−2i/d);  θ = p·f_i.
    """
    d, base, alpha = config.head_dim, config.rope_base, config.rope_alpha
    if alpha > 1 and d > 2:  # with d = 2 the only frequency is f_0 = 1, whatever the base
        base = base * alpha ** (d / (d - 2))
    freqs = base ** (-2.0 * np.arange(d // 2) / d)
    angles = np.arange(config.max_seq_len, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_forward(x, cos, sin):
    """x [B, S, heads, d], cos/sin [S, d/2] of the positions → rotated x.

    Interleaved pairs (a, b) = (x_2i, x_2i+1) → (a·cosθ − b·sinθ, a·sinθ + b·cosθ).
    """
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = a * cos - b * sin
    y[..., 1::2] = a * sin + b * cos
    return y


def rope_backward(dy, cos, sin):
    """The inverse rotation Rᵀ (rotation by −θ): dx = rope_forward(dy, cos, −sin)."""
    return rope_forward(dy, cos, -sin)


def softmax_forward(z):
    """Max-subtracted softmax over the last axis: p = exp(z − max z) / Σ exp(z − max z)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dp, p):
    """dz = p ⊙ (dp − Σ_j p_j·dp_j), over the last axis."""
    return p * (dp - np.sum(p * dp, axis=-1, keepdims=True))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def swiglu_forward(a, b):
    """SwiGLU gate: h = silu(a) ⊙ b, silu(a) = a·σ(a)."""
    s = sigmoid(a)
    return a * s * b, s


def swiglu_backward(dh, a, b, s):
    """da = dh ⊙ b ⊙ σ(a)·(1 + a·(1 − σ(a))),  db = dh ⊙ silu(a)."""
    return dh * b * (s * (1.0 + a * (1.0 - s))), dh * (a * s)


def cross_entropy_forward(logits, targets):
    """logits [T, V], targets [T] → L_ce = (1/T)·Σ_t (lse_t − z_{t,y_t}), lse max-subtracted.

    The sum runs in float64 so the mean does not depend on T's summation order.
    """
    z = logits - logits.max(axis=-1, keepdims=True)
    lse = np.log(np.sum(np.exp(z), axis=-1))
    picked = z[np.arange(len(targets)), targets]
    loss = np.mean((lse - picked).astype(np.float64))
    return logits.dtype.type(loss), (z, lse, targets)


def cross_entropy_backward(saved):
    """dL/dz_tv = (softmax(z_t)_v − [v = y_t]) / T."""
    z, lse, targets = saved
    dz = np.exp(z - lse[:, None])
    dz[np.arange(len(targets)), targets] -= 1.0
    return dz / np.float32(len(targets))
