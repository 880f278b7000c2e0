"""Parameters by checkpoint name (CONTRACT §2): shapes, initialisation, loading."""

import zlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .config import ModelConfig, TrainConfig, read_json
from .errors import CheckpointError, ConfigError


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


def current(directory, name):
    """Checkpoint file `name` of `directory` as `moe train` left it: the copy in
    `.checkpoint-commit/` while a committed save is still moving files into place
    (src/checkpoint.rs), else the file itself."""
    committed = Path(directory) / ".checkpoint-commit" / name
    return committed if committed.exists() else Path(directory) / name


def read_tensors(path, shapes, suffixes=("",)):
    """([{name: float32 array} per suffix], step in the metadata) of a safetensors
    file that must hold exactly `<name><suffix>` for every name of `shapes` and
    every suffix, float32, of that shape and finite."""
    try:
        with safe_open(str(path), "np") as f:
            found = {n: f.get_tensor(n) for n in f.keys()}
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    expected = {n + s for s in suffixes for n in shapes}
    missing, extra = expected - set(found), set(found) - expected
    if missing or extra:
        raise CheckpointError(f"{path}: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    buffers = []
    for suffix in suffixes:
        tensors = {}
        for name, shape in shapes.items():
            t = found[name + suffix]
            if t.shape != shape or t.dtype != np.float32:
                raise CheckpointError(f"{path}: {name + suffix}: expected float32 {shape}, found {t.dtype} {t.shape}")
            if not np.all(np.isfinite(t)):
                raise CheckpointError(f"{path}: {name + suffix} has a non-finite value")
            tensors[name] = np.ascontiguousarray(t)
        buffers.append(tensors)
    step = metadata.get("step", "0")
    if not step.isdigit():
        raise CheckpointError(f"{path}: metadata step {step!r} is not a step count")
    return buffers, int(step)


def load_checkpoint(directory):
    """(config, params) of a checkpoint directory: config.json + model.safetensors."""
    config = ModelConfig.load(current(directory, "config.json"))
    (params,), _ = read_tensors(current(directory, "model.safetensors"), param_shapes(config))
    return config, params


def load_training(directory):
    """A `moe train` checkpoint (CONTRACT §9): (config, params, (m, v), step, train).

    optimizer.safetensors holds the moments as `<name>.m` / `<name>.v` (v ≥ 0);
    state.json the steps done and the training settings (its `data` entry, the
    sampler's position, is not needed to take a step). Both safetensors files
    record the step they were written at, which must be state.json's: files from
    different saves are refused."""
    config = ModelConfig.load(current(directory, "config.json"))
    shapes = param_shapes(config)
    state_path = current(directory, "state.json")
    try:
        state = read_json(state_path)
        step, train = state.get("step"), state.get("train")
        if set(state) - {"step", "train", "data"} or not isinstance(train, dict) \
                or not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"expected {{step: integer ≥ 0, train: {{…}}, data}}, found keys {sorted(state)}")
        train = TrainConfig.from_dict(train)
    except ConfigError as e:
        raise CheckpointError(f"{state_path}: {e}") from e
    loaded = {}
    for file, suffixes in (("model.safetensors", ("",)), ("optimizer.safetensors", (".m", ".v"))):
        path = current(directory, file)
        loaded[file], saved_at = read_tensors(path, shapes, suffixes)
        if saved_at != step:
            raise CheckpointError(f"{path}: written at step {saved_at} but state.json says step {step} "
                                  "(files from different saves)")
    (params,), (m, v) = loaded["model.safetensors"], loaded["optimizer.safetensors"]
    negative = next((n for n, x in v.items() if np.any(x < 0)), None)
    if negative:
        raise CheckpointError(f"{directory}: {negative}.v: negative second moment")
    return config, params, (m, v), step, train
