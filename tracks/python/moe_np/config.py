"""Model and training configs (CONTRACT §1 and §6), loaded from JSON and checked."""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ConfigError

RMS_EPS = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    """The twelve keys of `config.json` (plus the optional `rms_norm_eps`)."""

    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    rope_base: float = 10000.0
    rope_alpha: float = 1.0
    rms_norm_eps: float = RMS_EPS

    @staticmethod
    def preset(name):
        """tiny, small or default_6_9b (CONTRACT §1)."""
        presets = {
            "tiny": dict(hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, n_experts=4,
                         top_k=2, ffn_dim=256, vocab_size=1000, max_seq_len=512),
            "small": dict(hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=64, n_experts=4,
                          top_k=2, ffn_dim=1024, vocab_size=1000, max_seq_len=512),
            "default_6_9b": dict(hidden_dim=768, n_layers=30, n_heads=12, n_kv_heads=1, head_dim=64,
                                 n_experts=16, top_k=4, ffn_dim=6144, vocab_size=32000,
                                 max_seq_len=32768, rope_alpha=8.0),
        }
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r} (expected one of {', '.join(presets)})")
        return ModelConfig(**presets[name])

    @staticmethod
    def from_dict(values):
        """A validated config from a dict with exactly the contract's keys."""
        known = {f.name for f in fields(ModelConfig)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        required = known - {"rms_norm_eps"}
        missing = required - set(values)
        if missing:
            raise ConfigError(f"missing config keys: {', '.join(sorted(missing))}")
        for name in required - {"rope_base", "rope_alpha"}:
            if not isinstance(values[name], int) or isinstance(values[name], bool):
                raise ConfigError(f"{name} = {values[name]!r} must be an integer")
        config = ModelConfig(**values)
        config.validate()
        return config

    @staticmethod
    def load(path):
        """Reads and validates `config.json`."""
        return ModelConfig.from_dict(read_json(path))

    def validate(self):
        """Every constraint of CONTRACT §1 (and what RoPE needs)."""
        for f in fields(self):
            if f.type is int and getattr(self, f.name) <= 0:
                raise ConfigError(f"{f.name} must be > 0")
        if self.n_heads * self.head_dim != self.hidden_dim:
            raise ConfigError(f"n_heads·head_dim = {self.n_heads}·{self.head_dim} must equal "
                              f"hidden_dim = {self.hidden_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads = {self.n_heads} must be divisible by n_kv_heads = {self.n_kv_heads}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k = {self.top_k} must be ≤ n_experts = {self.n_experts}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = {self.head_dim} must be even (RoPE rotates pairs)")
        for name in ("rope_base", "rope_alpha", "rms_norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} = {value!r} must be finite and > 0")

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (CONTRACT §6); missing keys take the defaults."""

    lr: float = 1e-3
    warmup_steps: int = 10
    total_steps: int = 1200
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_alpha: float = 0.01
    seed: int = 42

    @staticmethod
    def from_dict(values):
        known = {f.name for f in fields(TrainConfig)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown training keys: {', '.join(sorted(unknown))}")
        config = TrainConfig(**values)
        config.validate()
        return config

    @staticmethod
    def load(path):
        return TrainConfig.from_dict(read_json(path))

    def validate(self):
        """Finite values in range: lr ≥ 0, min_lr_ratio ∈ [0, 1], β ∈ [0, 1), eps > 0, decay and α ≥ 0."""
        for name in ("lr", "min_lr_ratio", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "aux_loss_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ConfigError(f"{name} = {value!r} must be a finite number")
        for name in ("warmup_steps", "total_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} = {value!r} must be an integer ≥ 0")
        if self.lr < 0:
            raise ConfigError(f"lr = {self.lr} must be ≥ 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} must be in [0, 1)")
        if self.eps <= 0:
            raise ConfigError(f"eps = {self.eps} must be > 0")
        if self.weight_decay < 0 or self.aux_loss_alpha < 0:
            raise ConfigError("weight_decay and aux_loss_alpha must be ≥ 0")


def read_json(path):
    """A JSON object from `path`, or a ConfigError saying why not."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return values
