"""The whole model (CONTRACT §3–§5): batches, forward, losses and the backward
for every parameter."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention import attention_backward, attention_forward
from .errors import InputError
from .layers import (cross_entropy_backward, cross_entropy_forward, embedding_backward,
                     embedding_forward, linear_backward, linear_forward, rmsnorm_backward,
                     rmsnorm_forward, rope_tables)
from .moe import moe_backward, moe_forward
from .params import init_params, param_shapes


@dataclass
class Batch:
    """ids and targets [B, S] (int64)."""

    ids: np.ndarray
    targets: np.ndarray

    @staticmethod
    def from_rows(ids, targets):
        """A batch from equal-length, non-empty rows of token ids."""
        if not ids or len(ids) != len(targets):
            raise InputError(f"batch: {len(ids)} id rows and {len(targets)} target rows (need equal, > 0)")
        seq = len(ids[0])
        for b, (i, t) in enumerate(zip(ids, targets)):
            if len(i) != seq or len(t) != seq or seq == 0:
                raise InputError(f"batch row {b}: {len(i)} ids and {len(t)} targets, expected {seq} > 0")
        try:
            return Batch(np.asarray(ids, np.int64), np.asarray(targets, np.int64))
        except (TypeError, ValueError, OverflowError) as e:
            raise InputError(f"batch: token ids must be integers ({e})") from e

    @staticmethod
    def load(path):
        """`{"ids": [[...]], "targets": [[...]]}` from a JSON file."""
        try:
            rows = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: {e}") from e
        if not isinstance(rows, dict) or set(rows) != {"ids", "targets"}:
            raise InputError(f"{path}: expected exactly the keys ids and targets")
        return Batch.from_rows(rows["ids"], rows["targets"])


@dataclass
class Losses:
    """ce = L_ce; aux = Σ_layers α·E·Σ_e f_e·P_e; total = ce + aux."""

    ce: np.floating
    aux: np.floating

    @property
    def total(self):
        return self.ce + self.aux


class Model:
    """Config, parameters {checkpoint name: array} and the RoPE tables."""

    def __init__(self, config, params):
        shapes = param_shapes(config)
        if set(params) != set(shapes):
            raise InputError("parameters do not match the config's names")
        self.config, self.params = config, params
        self.cos, self.sin = rope_tables(config)

    @staticmethod
    def new(config, seed):
        return Model(config, init_params(config, seed))

    def layer(self, l):
        """The weights of block l, grouped as the layers read them."""
        w = lambda name: self.params[f"layers.{l}.{name}.weight"]
        experts = [{n: w(f"moe.experts.{e}.{n}") for n in ("gate_proj", "up_proj", "down_proj")}
                   for e in range(self.config.n_experts)]
        return {
            "attn_norm": w("attn_norm"), "moe_norm": w("moe_norm"),
            "attn": {n: w(f"attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "moe": {"router": w("moe.router"), "experts": experts},
        }

    def check_ids(self, ids, offset=0):
        """ids [B, S] non-empty, every id < V, offset + S ≤ max_seq_len."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.size == 0:
            raise InputError(f"ids must be a non-empty [B, S] array, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InputError(f"token id out of range [0, {self.config.vocab_size})")
        if offset + ids.shape[1] > self.config.max_seq_len:
            raise InputError(f"sequence of {offset + ids.shape[1]} exceeds max_seq_len {self.config.max_seq_len}")
        return ids

    def forward(self, ids, cache=None):
        """ids [B, S] → logits [B, S, V]. With a KvCache, positions continue after it."""
        offset = cache.length if cache is not None else 0
        logits, _ = self._forward(self.check_ids(ids, offset), cache, offset)
        if cache is not None:
            cache.length += ids.shape[1]
        return logits

    def _forward(self, ids, cache=None, offset=0):
        """logits [B, S, V] and, per block, what the backward needs.

        x = embed[ids];  per block: x += Attn(RMSNorm(x));  x += MoE(RMSNorm(x));
        logits = RMSNorm_final(x)·lm_headᵀ.
        """
        c = self.config
        B, S = ids.shape
        x = embedding_forward(self.params["embed.weight"], ids)
        tape = []
        for l in range(c.n_layers):
            w = self.layer(l)
            xn, norm1 = rmsnorm_forward(x, w["attn_norm"], c.rms_norm_eps)
            y, attn = attention_forward(xn, w["attn"], c, self.cos, self.sin, offset, cache, l)
            x = x + y
            xn, norm2 = rmsnorm_forward(x, w["moe_norm"], c.rms_norm_eps)
            y, balance, chosen, moe = moe_forward(xn.reshape(B * S, -1), w["moe"], c)
            x = x + y.reshape(B, S, -1)
            tape.append({"norm1": norm1, "attn": attn, "norm2": norm2, "moe": moe,
                         "balance": balance, "chosen": chosen})
        xn, final = rmsnorm_forward(x, self.params["final_norm.weight"], c.rms_norm_eps)
        logits = linear_forward(xn, self.params["lm_head.weight"])
        tape.append({"final": final, "xn": xn})
        return logits, tape

    def loss_and_grads(self, batch, aux_alpha):
        """(losses, grads {name: array}, logits [B, S, V], routes [per layer: [T, k]]).

        L = L_ce + Σ_l α·E·Σ_e f_e·P_e, and dL/dθ for every parameter θ, by the chain
        rule in reverse block order (sublayer backward, then its norm's backward).
        """
        c = self.config
        ids = self.check_ids(batch.ids)
        if batch.targets.shape != ids.shape:
            raise InputError(f"targets shape {batch.targets.shape} differs from ids {ids.shape}")
        if batch.targets.min() < 0 or batch.targets.max() >= c.vocab_size:
            raise InputError(f"target id out of range [0, {c.vocab_size})")
        B, S = ids.shape
        logits, tape = self._forward(ids)
        ce, ce_saved = cross_entropy_forward(logits.reshape(B * S, -1), batch.targets.reshape(-1))
        aux_scale = aux_alpha * c.n_experts
        aux = logits.dtype.type(aux_scale * sum(float(t["balance"]) for t in tape[:-1]))
        grads = {}

        dlogits = cross_entropy_backward(ce_saved).reshape(B, S, -1)
        top = tape[-1]
        dxn, grads["lm_head.weight"] = linear_backward(dlogits, top["xn"], self.params["lm_head.weight"])
        dx, grads["final_norm.weight"] = rmsnorm_backward(dxn, top["final"])
        for l in reversed(range(c.n_layers)):
            t, w, p = tape[l], self.layer(l), f"layers.{l}"
            dxn, g = moe_backward(dx.reshape(B * S, -1), t["moe"], w["moe"], c, aux_scale)
            grads[f"{p}.moe.router.weight"] = g["router"]
            for e, ge in enumerate(g["experts"]):
                for name, value in ge.items():
                    grads[f"{p}.moe.experts.{e}.{name}.weight"] = value
            dxr, grads[f"{p}.moe_norm.weight"] = rmsnorm_backward(dxn.reshape(B, S, -1), t["norm2"])
            dx = dx + dxr
            dxn, g = attention_backward(dx, t["attn"], w["attn"], c)
            for name, value in g.items():
                grads[f"{p}.attn.{name}.weight"] = value
            dxr, grads[f"{p}.attn_norm.weight"] = rmsnorm_backward(dxn, t["norm1"])
            dx = dx + dxr
        grads["embed.weight"] = embedding_backward(dx, ids, c.vocab_size)
        routes = [t["chosen"] for t in tape[:-1]]
        return Losses(ce, aux), grads, logits, routes
