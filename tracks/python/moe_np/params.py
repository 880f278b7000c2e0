"""Parameters by checkpoint name (CONTRACT §2): shapes, initialisation, loading."""

import zlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from .config import ModelConfig
from .errors import CheckpointError


def param_shapes(config):
    """{name: shape} of every tensor, in the contract's order. Linear weights are [out, in]."""
    h, f, e = config.hidden_dim, config.ffn_dim, config.n_experts
    hd, kvd = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"embed.weight": (config.vocab_size, h)}
    for l in range(config.n_layers):
        p = f"layers.{l}"
        shapes[f"{p}.attn_norm.weight"] = (h,)
        shapes[f"{p}.attn.q_proj.weight"] = (hd, h)
        shapes[f"{p}.attn.k_proj.weight"] = (kvd, h)
        shapes[f"{p}.attn.v_proj.weight"] = (kvd, h)
        shapes[f"{p}.attn.o_proj.weight"] = (h, hd)
        shapes[f"{p}.moe_norm.weight"] = (h,)
        shapes[f"{p}.moe.router.weight"] = (e, h)
        for x in range(e):
            shapes[f"{p}.moe.experts.{x}.gate_proj.weight"] = (f, h)
            shapes[f"{p}.moe.experts.{x}.up_proj.weight"] = (f, h)
            shapes[f"{p}.moe.experts.{x}.down_proj.weight"] = (h, f)
    shapes["final_norm.weight"] = (h,)
    shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def init_params(config, seed):
    """Gains = 1; every matrix ~ N(0, 2/fan_in), fan_in = its `in` size (h for the embedding).

    Each tensor draws from its own NumPy stream seeded by (seed, crc32(name)), so no
    two tensors share values and the same seed gives bit-identical weights. (The
    values differ from the Rust crate's ChaCha8 streams; parity reads `moe init`
    checkpoints instead.)
    """
    params = {}
    for name, shape in param_shapes(config).items():
        if len(shape) == 1:
            params[name] = np.ones(shape, np.float32)
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        std = np.sqrt(2.0 / shape[1])
        params[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return params


def load_checkpoint(directory):
    """(config, params) of a checkpoint directory: config.json + model.safetensors."""
    directory = Path(directory)
    config = ModelConfig.load(directory / "config.json")
    try:
        tensors = load_file(directory / "model.safetensors")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{directory / 'model.safetensors'}: {e}") from e
    shapes = param_shapes(config)
    missing = set(shapes) - set(tensors)
    extra = set(tensors) - set(shapes)
    if missing or extra:
        raise CheckpointError(f"{directory}: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for name, shape in shapes.items():
        t = tensors[name]
        if t.shape != shape or t.dtype != np.float32:
            raise CheckpointError(f"{name}: expected float32 {shape}, found {t.dtype} {t.shape}")
    return config, {name: np.ascontiguousarray(tensors[name]) for name in shapes}
