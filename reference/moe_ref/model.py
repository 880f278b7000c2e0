"""The model of CONTRACT §3–§4 and the optimizer step of §6, written plainly in JAX.

Parameters are a dict from checkpoint names (CONTRACT §2) to arrays; a linear
weight is stored [out, in] and applied as x @ W.T.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

# RMSNorm ε of a config.json without "rms_norm_eps" (CONTRACT §3).
DEFAULT_RMS_EPS = 1e-6


def load_checkpoint(directory, dtype=jnp.float32):
    """config.json and model.safetensors of a checkpoint directory."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    return config, {name: jnp.asarray(value, dtype=dtype) for name, value in tensors.items()}


def rms_norm(x, gain, config):
    """y = γ · x / sqrt(mean(x²) + ε) over the last axis, ε = config's rms_norm_eps."""
    eps = config.get("rms_norm_eps", DEFAULT_RMS_EPS)
    return gain * (x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def rope_tables(config, seq_len, dtype):
    """cos θ and sin θ [S, d/2] for positions 0..S-1, computed in float64.

    b' = base if α ≤ 1 else base·α^(d/(d−2));  f_i = b'^(−2i/d);  θ = p·f_i.
    """
    d = config["head_dim"]
    base, alpha = config["rope_base"], config["rope_alpha"]
    if alpha > 1:
        base = base * alpha ** (d / (d - 2))
    freqs = base ** (-2.0 * np.arange(d // 2) / d)
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * freqs[None, :]
    return jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)


def rope(x, cos, sin):
    """Rotates interleaved pairs (2i, 2i+1) of x [B, S, heads, d] by θ(position, i)."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return rotated.reshape(x.shape)


def attention(params, layer, config, x):
    """Causal grouped-query attention with RoPE; x [B, S, h] → [B, S, h]."""
    B, S, _ = x.shape
    H, Hkv, d = config["n_heads"], config["n_kv_heads"], config["head_dim"]
    w = lambda name: params[f"layers.{layer}.attn.{name}.weight"]
    q = (x @ w("q_proj").T).reshape(B, S, H, d)
    k = (x @ w("k_proj").T).reshape(B, S, Hkv, d)
    v = (x @ w("v_proj").T).reshape(B, S, Hkv, d)
    cos, sin = rope_tables(config, S, x.dtype)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    # Query head i reads key/value head i // (H / Hkv).
    k = jnp.repeat(k, H // Hkv, axis=2)
    v = jnp.repeat(v, H // Hkv, axis=2)
    scores = jnp.einsum("bshd,bthd->bhst", q, k) / math.sqrt(d)
    causal = jnp.tril(jnp.ones((S, S), dtype=bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhst,bthd->bshd", weights, v).reshape(B, S, H * d)
    return out @ w("o_proj").T


def moe(params, layer, config, x):
    """Top-k mixture of SwiGLU experts; x [T, h] → (out [T, h], Σ_e f_e·P_e, chosen [T, k])."""
    E, k = config["n_experts"], config["top_k"]
    prefix = f"layers.{layer}.moe"
    probs = jax.nn.softmax(x @ params[f"{prefix}.router.weight"].T, axis=-1)
    # Top-k by probability, descending; a stable sort keeps ties in index order.
    chosen = jnp.argsort(-probs, axis=-1, stable=True)[:, :k]
    top = jnp.take_along_axis(probs, chosen, axis=-1)
    gates = top / jnp.sum(top, axis=-1, keepdims=True)

    def expert(e):
        w = lambda name: params[f"{prefix}.experts.{e}.{name}.weight"]
        return (jax.nn.silu(x @ w("gate_proj").T) * (x @ w("up_proj").T)) @ w("down_proj").T

    every = jnp.stack([expert(e) for e in range(E)], axis=1)  # [T, E, h]
    picked = jnp.take_along_axis(every, chosen[:, :, None], axis=1)  # [T, k, h]
    out = jnp.sum(gates[:, :, None] * picked, axis=1)

    T = x.shape[0]
    f = jax.lax.stop_gradient(jax.nn.one_hot(chosen, E, dtype=x.dtype).sum(axis=(0, 1)) / (T * k))
    P = jnp.mean(probs, axis=0)
    return out, jnp.sum(f * P), chosen


def forward(params, config, ids):
    """Logits [B, S, V], the per-layer balance terms and the routes."""
    B, S = ids.shape
    h = config["hidden_dim"]
    x = params["embed.weight"][ids]
    balances, routes = [], []
    for layer in range(config["n_layers"]):
        norm = lambda name: params[f"layers.{layer}.{name}.weight"]
        x = x + attention(params, layer, config, rms_norm(x, norm("attn_norm"), config))
        out, balance, chosen = moe(params, layer, config, rms_norm(x, norm("moe_norm"), config).reshape(B * S, h))
        x = x + out.reshape(B, S, h)
        balances.append(balance)
        routes.append(chosen)
    logits = rms_norm(x, params["final_norm.weight"], config) @ params["lm_head.weight"].T
    return logits, balances, routes


def loss(params, config, ids, targets, aux_alpha):
    """Total loss L_ce + Σ_l α·E·Σ_e f_e·P_e, with (ce, aux, logits, routes) alongside."""
    logits, balances, routes = forward(params, config, ids)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))
    aux = aux_alpha * config["n_experts"] * sum(balances)
    return ce + aux, (ce, aux, logits, routes)


def loss_and_grads(params, config, ids, targets, aux_alpha):
    """(total, (ce, aux, logits, routes)), gradient dict — by jax.grad."""
    fn = jax.value_and_grad(lambda p: loss(p, config, ids, targets, aux_alpha), has_aux=True)
    return jax.jit(fn)(params)


# Floor of the cosine schedule as a fraction of the peak lr, for settings
# without "min_lr_ratio" (CONTRACT §6).
DEFAULT_MIN_LR_RATIO = 0.1


def learning_rate(train, t):
    """Warm-up then cosine to min_lr = min_lr_ratio·lr (CONTRACT §6), t 1-based."""
    lr, warmup, total = train["lr"], train["warmup_steps"], train["total_steps"]
    if t <= warmup:
        return lr * t / warmup
    progress = min(1.0, (t - warmup) / (total - warmup)) if total > warmup else 1.0
    min_lr = train.get("min_lr_ratio", DEFAULT_MIN_LR_RATIO) * lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def adamw_step(params, grads, t, train, moments=None):
    """One AdamW step at step number t (1-based) after global-norm clipping,
    continuing the moments (m, v) — dicts like params; zero when None:

        g ← s·g;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
        p ← p − lr·wd·p  (2-D weights only);  p ← p − lr·(m/(1−β1ᵗ)) / (sqrt(v/(1−β2ᵗ)) + ε)

    Returns (params after, (m after, v after), gradient norm before clipping).
    """
    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))
    clip = train["grad_clip"]
    scale = clip / (norm + 1e-6) if clip > 0 and norm > clip else 1.0
    lr = learning_rate(train, t)
    b1, b2, eps, wd = train["beta1"], train["beta2"], train["eps"], train["weight_decay"]
    out, m_out, v_out = {}, {}, {}
    for name, p in params.items():
        g = grads[name] * scale
        m0, v0 = (moments[0][name], moments[1][name]) if moments else (0.0, 0.0)
        m = b1 * m0 + (1 - b1) * g
        v = b2 * v0 + (1 - b2) * g * g
        if p.ndim == 2:
            p = p - lr * wd * p
        out[name] = p - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
        m_out[name], v_out[name] = m, v
    return out, (m_out, v_out), norm


def load_training(directory, dtype=jnp.float32):
    """A `moe train` checkpoint: (config, params, (m, v), steps done, train settings).

    The moments come from optimizer.safetensors (`<name>.m`, `<name>.v`, CONTRACT §9),
    the step count and settings from state.json.
    """
    directory = Path(directory)
    config, params = load_checkpoint(directory, dtype)
    moments = load_file(directory / "optimizer.safetensors")
    m = {name: jnp.asarray(moments[f"{name}.m"], dtype=dtype) for name in params}
    v = {name: jnp.asarray(moments[f"{name}.v"], dtype=dtype) for name in params}
    state = json.loads((directory / "state.json").read_text())
    return config, params, (m, v), state["step"], state["train"]


DEFAULT_TRAIN = {
    "lr": 1e-3,
    "warmup_steps": 10,
    "total_steps": 1200,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "aux_loss_alpha": 0.01,
    "seed": 42,
}
