"""rosetta-moe beside NumPy, PyTorch eager, torch.compile and JAX jit: the same
model, the same weights, the same inputs, timed in interleaved rounds on one core.

Every peer first proves it computes our function: its logits on the scenario's
batch must be within 1e-4 of `moe dump`'s on the same checkpoint. A training
peer also proves its step: its first step's loss must match `moe dump`'s within
1e-5 (relative) and its updated weights ours (see `check_step`). Then, round
after round, each implementation runs a few trials in turn (the order rotates),
so that drift of this noisy machine hits all of them alike. We report medians
and interquartile ranges of the per-run times, the ratio of medians, and per
scenario the best (fastest) peer. Compilation (torch.compile, jax.jit) happens
before the rounds: it is excluded from the trials and reported on its own.

The peers are plain, idiomatic versions of CONTRACT §3–§4 and §6. What each
does differently from rosetta-moe (see also PEER_NOTES, printed in the Markdown):
  * NumPy: forward only (no autograd); experts on their routed tokens; RoPE
    tables and the causal mask built once; K/V heads repeated for the grouped
    queries and the full S×S score square computed, then masked.
  * PyTorch eager: the same routed model in torch ops, RoPE tables built once;
    forward = logits only, under inference_mode; train step = loss.backward(),
    clip_grad_norm_, torch.optim.AdamW (defaults; decay on matrices only, §6).
  * torch.compile: the eager model and step under torch.compile (Inductor:
    C++ generated and built by the machine's compiler, g++), mode
    TORCH_COMPILE_MODE (--compile-mode). Each expert's `nonzero` is traced
    into the graph with a symbolic row count (capture_dynamic_output_shape_ops,
    the fix Dynamo's own graph-break hint names): one graph, same routed work
    as ours, no recompilation when routing changes. Train step = compiled
    loss + AOTAutograd backward, clip_grad_norm_, AdamW(fused=True).
  * torch.compile dense: the same with JAX's dense dispatch (every expert on
    every token): static shapes, which Inductor may prefer, at E/k× the
    expert work; the best peer is whichever of the two is faster.
  * JAX jit: the reference model of reference/moe_ref. jit needs static
    shapes, so it runs every expert on every token and keeps the top-k: E/k×
    the expert work (2× here). Train step = value_and_grad + clipping + AdamW
    in one jitted function with donated buffers.
"""

import os

# One core, one thread, for every implementation (set before the imports).
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
os.environ["JAX_PLATFORMS"] = "cpu"

# MOE_SIMD=avx2 on an AVX-512 machine stands in for an AVX2-only CPU (Zen 3
# class): rosetta-moe runs its AVX2 kernels, and every peer is capped to
# AVX2 too, through the switches its libraries read at start-up — PyTorch's
# ATen kernels and Inductor's generated C++ (ATEN_CPU_CAPABILITY), oneDNN
# and MKL, XLA (--xla_cpu_max_isa) and NumPy with its OpenBLAS.
ISA_CAPS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
        "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR",
    },
}
ISA_CAP = os.environ.get("MOE_SIMD", "")
for var, value in ISA_CAPS.get(ISA_CAP, {}).items():
    os.environ[var] = value
if ISA_CAP in ISA_CAPS:
    os.environ["XLA_FLAGS"] += f" --xla_cpu_max_isa={ISA_CAP.upper()}"
# Inductor's on-disk cache does not key its compiled kernels on the cap: a
# capped run that found an uncapped run's kernels failed calling them
# ("requires 4 args", on a Zen 4). Each cap keeps its own cache.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), f"torchinductor-peers-{ISA_CAP or 'native'}"),
)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "reference"))

RMS_EPS = 1e-6
# (scenario id of `moe bench`, config, what, batch, seq)
SCENARIOS = [
    ("dispatch_warm", "tiny", "forward", 2, 32),
    ("mem_train_step", "tiny", "train", 2, 8),
    ("scale_forward_256", "small", "forward", 2, 32),
    ("scale_train_256", "small", "train", 2, 8),
    *[(f"mem_scale_batch_{b}", "tiny", "forward", b, 32) for b in (1, 2, 4, 8)],
    *[(f"mem_scale_seq_{s}", "tiny", "forward", 2, s) for s in (8, 16, 32, 64)],
]
# --quick: the four headline scenarios, few rounds (a check of the machinery).
QUICK = {"scenarios": ["dispatch_warm", "mem_train_step", "scale_forward_256", "scale_train_256"],
         "rounds": 2, "trials": 3, "warmup": 2}
# Peak lr from step 1: `moe dump` is given warm-up 1 so that its step uses the
# same constant lr as the peers' optimizers (CONTRACT §6 keys).
TRAIN = {"lr": 1e-3, "warmup_steps": 1, "total_steps": 1, "beta1": 0.9, "beta2": 0.95,
         "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0, "aux_loss_alpha": 0.01}
TOL_LOGITS = 1e-4  # max |logit difference|
TOL_LOSS = 1e-5  # |a − b| / |b|
# AdamW's first step moves each weight by ≈ lr·sign(g): entries whose gradient
# is at float32 rounding level may move either way (see reference parity), so
# the updated weights gate on the share of entries more than lr/1000 from ours
# (≈ 1e-4 of them here; a wrong decay or bias correction moves nearly all).
TOL_MOVED = 1e-3
# Inductor mode (--compile-mode). "default" was faster than
# "max-autotune-no-cudagraphs" on the small train step and tied on the tiny one
# in adjacent runs here, and compiles several times sooner ("reduce-overhead"
# is CUDA graphs, nothing on a CPU); re-check with
# `bench/peers/run --quick --compile-mode max-autotune-no-cudagraphs`. The
# compiled step's optimizer is AdamW(fused=True): one kernel per group, several
# times faster than the default per-tensor loop in a profile of the tiny step.
TORCH_COMPILE_MODE = "default"

PEER_NOTES = {
    "NumPy": "forward only (no autograd); routed experts; RoPE tables and causal mask built "
             "once; repeats K/V heads and computes the full S×S score square, then masks.",
    "PyTorch eager": "routed experts (one `nonzero` per expert); RoPE tables built once; forward "
                     "= logits only under `inference_mode`; train = backward, `clip_grad_norm_`, "
                     "default `AdamW`.",
    "torch.compile": "the eager model and step under `torch.compile` (Inductor C++), mode "
                     "`{mode}`; each expert's `nonzero` traced into one graph "
                     "(`capture_dynamic_output_shape_ops`): routed work as ours; train = compiled "
                     "loss + AOTAutograd backward, `clip_grad_norm_`, `AdamW(fused=True)`. "
                     "Compilation is excluded from the trials (first calls below).",
    "torch.compile dense": "as torch.compile, with JAX's dense dispatch (every expert on every "
                           "token, then the top k): static shapes, E/k = 2× the expert work.",
    "JAX jit": "dense dispatch: every expert on every token (jit needs static shapes), "
               "E/k = 2× the expert work; one jitted train step (grad, clip, AdamW) with "
               "donated buffers.",
}


def inputs(batch, seq):
    """The inputs of `moe bench`: ids i mod 1000, targets (i + 1) mod 1000."""
    i = np.arange(batch * seq)
    return (i % 1000).reshape(batch, seq), ((i + 1) % 1000).reshape(batch, seq)


def rope_tables(config, seq):
    """cos θ, sin θ [1, S, 1, d/2] float32 for positions 0..S-1, built once per
    peer like ours (CONTRACT §3, computed in float64, NTK-scaled base when α > 1)."""
    d, base, alpha = config["head_dim"], config["rope_base"], config["rope_alpha"]
    if alpha > 1:
        base = base * alpha ** (d / (d - 2))
    angles = np.arange(seq)[:, None] * base ** (-2.0 * np.arange(d // 2) / d)[None, :]
    return tuple(np.float32(t)[None, :, None, :] for t in (np.cos(angles), np.sin(angles)))


# ---------------------------------------------------------------- NumPy

def numpy_forward(p, config, ids, cos, sin, causal):
    """Logits [B, S, V] of ids [B, S]; cos, sin [1, S, 1, d/2]; causal [S, S]."""
    B, S = ids.shape
    h, H, Hkv, d = config["hidden_dim"], config["n_heads"], config["n_kv_heads"], config["head_dim"]
    E, k = config["n_experts"], config["top_k"]

    def norm(x, g):
        return g * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS))

    def rope(x):
        a, b = x[..., 0::2], x[..., 1::2]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    x = p["embed.weight"][ids]
    for l in range(config["n_layers"]):
        w = lambda name: p[f"layers.{l}.{name}.weight"]
        xn = norm(x, w("attn_norm"))
        q = rope((xn @ w("attn.q_proj").T).reshape(B, S, H, d))
        kk = rope((xn @ w("attn.k_proj").T).reshape(B, S, Hkv, d))
        v = (xn @ w("attn.v_proj").T).reshape(B, S, Hkv, d)
        kk, v = np.repeat(kk, H // Hkv, axis=2), np.repeat(v, H // Hkv, axis=2)
        scores = np.einsum("bshd,bthd->bhst", q, kk) / np.float32(math.sqrt(d))
        att = softmax(np.where(causal, scores, -np.inf))
        x = x + np.einsum("bhst,bthd->bshd", att, v).reshape(B, S, H * d) @ w("attn.o_proj").T
        xn = norm(x, w("moe_norm")).reshape(B * S, h)
        probs = softmax(xn @ w("moe.router").T)
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(probs, chosen, axis=-1)
        gates = top / top.sum(axis=-1, keepdims=True)
        out = np.zeros_like(xn)
        for e in range(E):
            rows, slot = np.nonzero(chosen == e)
            if rows.size:
                ex = lambda name: w(f"moe.experts.{e}.{name}")
                xe = xn[rows]
                g = xe @ ex("gate_proj").T
                act = g / (1 + np.exp(-g)) * (xe @ ex("up_proj").T)
                out[rows] += gates[rows, slot][:, None] * (act @ ex("down_proj").T)
        x = x + out.reshape(B, S, h)
    return norm(x, p["final_norm.weight"]) @ p["lm_head.weight"].T


class NumPyPeer:
    name = "NumPy"

    def __init__(self, params, config, what, ids, targets):
        if what != "forward":
            raise NotImplementedError("NumPy has no autograd: forward only")
        S = ids.shape[1]
        self.args = (params, config, ids, *rope_tables(config, S), np.tri(S, dtype=bool))

    def logits(self):
        return numpy_forward(*self.args)

    def run(self):
        numpy_forward(*self.args)


# ---------------------------------------------------------------- PyTorch

def torch_forward(torch, p, config, ids, cos, sin, causal, balance, dense, dropout=0.0):
    """Logits [B, S, V] of ids [B, S] and, when `balance`, Σ_l Σ_e f_e·P_e
    (else 0); cos, sin [1, S, 1, d/2]; causal [S, S] bool. `dense` runs every
    expert on every token (static shapes, E/k× the expert work). `dropout` > 0
    is the contract's residual dropout (src/dropout.rs: each sublayer output
    kept with probability 1 − p, scaled by 1/(1 − p)), with torch's own masks."""
    F = torch.nn.functional

    def branch(y):
        return F.dropout(y, dropout) if dropout > 0 else y

    B, S = ids.shape
    h, H, Hkv, d = config["hidden_dim"], config["n_heads"], config["n_kv_heads"], config["head_dim"]
    E, k = config["n_experts"], config["top_k"]

    def norm(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS))

    def rope(x):
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)

    x = p["embed.weight"][ids]
    balances = 0.0
    for l in range(config["n_layers"]):
        w = lambda name: p[f"layers.{l}.{name}.weight"]
        xn = norm(x, w("attn_norm"))
        q = rope((xn @ w("attn.q_proj").T).view(B, S, H, d))
        kk = rope((xn @ w("attn.k_proj").T).view(B, S, Hkv, d))
        v = (xn @ w("attn.v_proj").T).view(B, S, Hkv, d)
        kk, v = kk.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bshd,bthd->bhst", q, kk) / math.sqrt(d)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        x = x + branch(torch.einsum("bhst,bthd->bshd", att, v).reshape(B, S, H * d)
                       @ w("attn.o_proj").T)
        xn = norm(x, w("moe_norm")).reshape(B * S, h)
        probs = torch.softmax(xn @ w("moe.router").T, dim=-1)
        top, chosen = torch.topk(probs, k, dim=-1)
        gates = top / top.sum(-1, keepdim=True)
        expert = lambda e, xe: F.silu(xe @ w(f"moe.experts.{e}.gate_proj").T) * (
            xe @ w(f"moe.experts.{e}.up_proj").T) @ w(f"moe.experts.{e}.down_proj").T
        if dense:  # every expert on every token [T, E, h], then the top k of each
            every = torch.stack([expert(e, xn) for e in range(E)], dim=1)
            out = (gates[:, :, None] * every.gather(1, chosen[:, :, None].expand(-1, -1, h))).sum(1)
        else:
            out = torch.zeros_like(xn)
            for e in range(E):
                rows, slot = torch.nonzero(chosen == e, as_tuple=True)
                out = out.index_add(0, rows, gates[rows, slot][:, None] * expert(e, xn[rows]))
        x = x + branch(out.view(B, S, h))
        if balance:
            # Routed share f_e by one-hot counts (static shape: no graph break).
            f = F.one_hot(chosen, E).sum((0, 1)).to(xn.dtype) / (B * S * k)
            balances = balances + torch.sum(f * probs.mean(0))
    return norm(x, p["final_norm.weight"]) @ p["lm_head.weight"].T, balances


def torch_loss(torch, p, config, ids, targets, cos, sin, causal, dense, dropout=0.0):
    """(CE + α·E·Σ_l Σ_e f_e·P_e, logits) — CONTRACT §4 (§6's dropout when > 0)."""
    logits, balances = torch_forward(torch, p, config, ids, cos, sin, causal, True, dense, dropout)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return ce + TRAIN["aux_loss_alpha"] * config["n_experts"] * balances, logits


class TorchPeer:
    """PyTorch eager; TorchCompilePeer overrides `compile` and the optimizer."""
    name = "PyTorch eager"
    fused, dense = False, False

    def __init__(self, params, config, what, ids, targets):
        import torch

        torch.set_num_threads(1)
        self.torch, self.config, self.what = torch, config, what
        self.p = {n: torch.tensor(v, requires_grad=what == "train") for n, v in params.items()}
        S = ids.shape[1]
        cos, sin = (torch.from_numpy(t) for t in rope_tables(config, S))
        ids, targets, causal = torch.tensor(ids), torch.tensor(targets), torch.ones(S, S).tril() > 0
        self.forward_args, self.loss_args = (ids, cos, sin, causal), (ids, targets, cos, sin, causal)
        dense = self.dense
        self.forward = self.compile(
            lambda p, ids, cos, sin, causal: torch_forward(torch, p, config, ids, cos, sin, causal,
                                                           False, dense)[0])
        self.loss = self.compile(
            lambda p, ids, targets, cos, sin, causal, dropout=0.0: torch_loss(
                torch, p, config, ids, targets, cos, sin, causal, dense, dropout))
        if what == "train":
            matrices = [t for t in self.p.values() if t.ndim == 2]
            vectors = [t for t in self.p.values() if t.ndim != 2]
            self.opt = torch.optim.AdamW(
                [{"params": matrices, "weight_decay": TRAIN["weight_decay"]},
                 {"params": vectors, "weight_decay": 0.0}],
                lr=TRAIN["lr"], betas=(TRAIN["beta1"], TRAIN["beta2"]), eps=TRAIN["eps"],
                **({"fused": True} if self.fused else {}))

    def compile(self, fn):
        return fn

    def logits(self):
        if self.what == "forward":
            with self.torch.inference_mode():
                return self.forward(self.p, *self.forward_args).numpy()
        # With grad on, as in the step (no_grad would be a second compilation).
        return self.loss(self.p, *self.loss_args)[1].detach().numpy()

    def run(self):
        """One forward (logits only) or one train step; the step returns its loss."""
        if self.what == "forward":
            with self.torch.inference_mode():
                self.forward(self.p, *self.forward_args)
            return None
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.p, *self.loss_args)[0]
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.p.values(), TRAIN["grad_clip"])
        self.opt.step()
        return loss.detach()

    def weights(self):
        return {n: t.detach().numpy() for n, t in self.p.items()}


class TorchCompilePeer(TorchPeer):
    name = "torch.compile"
    fused, dense, mode = True, False, TORCH_COMPILE_MODE

    def __init__(self, *args):
        import torch

        # Trace `nonzero` into the graph (its row count a symbolic size) rather
        # than break the graph at each expert: a break inside the layer loop
        # makes Dynamo run the whole forward eagerly.
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        super().__init__(*args)

    def compile(self, fn):
        return self.torch.compile(fn, mode=self.mode)


class TorchCompileDensePeer(TorchCompilePeer):
    """torch.compile of the JAX-style dense dispatch: static shapes, E/k× the expert work."""
    name = "torch.compile dense"
    dense = True


# ---------------------------------------------------------------- JAX

class JaxPeer:
    name = "JAX jit"

    def __init__(self, params, config, what, ids, targets):
        import jax
        import jax.numpy as jnp
        from moe_ref import model

        self.jax, self.what = jax, what
        self.p = {n: jnp.asarray(v) for n, v in params.items()}
        self.ids, self.targets = jnp.asarray(ids), jnp.asarray(targets)
        alpha = TRAIN["aux_loss_alpha"]
        self.forward = jax.jit(lambda p, ids: model.forward(p, config, ids)[0])
        if what != "train":
            return

        def step(p, m, v, t, ids, targets):
            loss, grads = jax.value_and_grad(
                lambda q: model.loss(q, config, ids, targets, alpha)[0])(p)
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads.values()))
            scale = jnp.minimum(1.0, TRAIN["grad_clip"] / (norm + 1e-6))
            b1, b2, lr = TRAIN["beta1"], TRAIN["beta2"], TRAIN["lr"]
            out = ({}, {}, {}, loss)
            for n, w in p.items():
                g = grads[n] * scale
                mn = b1 * m[n] + (1 - b1) * g
                vn = b2 * v[n] + (1 - b2) * g * g
                if w.ndim == 2:
                    w = w * (1 - lr * TRAIN["weight_decay"])
                update = (mn / (1 - b1**t)) / (jnp.sqrt(vn / (1 - b2**t)) + TRAIN["eps"])
                out[0][n], out[1][n], out[2][n] = w - lr * update, mn, vn
            return out

        self.step = jax.jit(step, donate_argnums=(0, 1, 2))
        self.m = {n: jnp.zeros_like(w) for n, w in self.p.items()}
        self.v = {n: jnp.zeros_like(w) for n, w in self.p.items()}
        self.t = 0

    def logits(self):
        return np.asarray(self.forward(self.p, self.ids))

    def run(self):
        """One forward or one train step; the step returns its loss (a device array)."""
        if self.what == "forward":
            self.forward(self.p, self.ids).block_until_ready()
            return None
        self.t += 1
        self.p, self.m, self.v, loss = self.step(self.p, self.m, self.v, float(self.t),
                                                 self.ids, self.targets)
        self.jax.block_until_ready(self.p)
        return loss

    def weights(self):
        return {n: np.asarray(w) for n, w in self.p.items()}


# ---------------------------------------------------------------- rosetta-moe

class RustPeer:
    """`moe bench --child ID`: our own suite's measurement of the scenario."""
    name = "rosetta-moe"

    def __init__(self, moe, scenario, trials):
        self.moe, self.scenario, self.trials = moe, scenario, trials

    def run_round(self):
        out = subprocess.run(
            [self.moe, "bench", "--child", self.scenario, "--trials", str(self.trials),
             "--warmup", "2"], check=True, capture_output=True, text=True)
        return [t / 1e9 for t in json.loads(out.stdout)["timings_ns"]]


# ---------------------------------------------------------------- harness

def quartiles(xs):
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return float(q1), float(med), float(q3)


def checkpoint(moe, work, config):
    """A `moe init` checkpoint of `config`, seed 42 (the suite's seed)."""
    out = work / config
    if not out.exists():
        subprocess.run([moe, "init", "--config", config, "--seed", "42", "--out", str(out)],
                       check=True, capture_output=True)
    return out


def our_dump(moe, work, ckpt, batch, seq):
    """`moe dump` of the scenario's batch: logits, loss.total, after.* (one step at lr)."""
    ids, targets = inputs(batch, seq)
    batch_file = work / f"batch_{batch}_{seq}.json"
    batch_file.write_text(json.dumps({"ids": ids.tolist(), "targets": targets.tolist()}))
    train_file = work / "train.json"
    train_file.write_text(json.dumps(TRAIN))
    dump = work / f"dump_{ckpt.name}_{batch}_{seq}.safetensors"
    subprocess.run([moe, "dump", "--checkpoint", str(ckpt), "--batch", str(batch_file),
                    "--train", str(train_file), "--out", str(dump)], check=True, capture_output=True)
    return load_file(dump)


def check_step(peer, dump):
    """Runs the peer's first train step; its loss and updated weights against ours.

    Loss: relative error ≤ TOL_LOSS. Weights: at most a TOL_MOVED share of the
    entries may differ by more than lr/1000 (a rounding-level gradient whose
    sign flipped); the largest difference is reported."""
    loss = float(peer.run())
    ours = float(dump["loss.total"][0])
    loss_err = abs(loss - ours) / abs(ours)
    after = peer.weights()
    moved = sum(int(np.count_nonzero(np.abs(w - dump[f"after.{n}"]) > TRAIN["lr"] / 1000))
                for n, w in after.items())
    share = moved / sum(w.size for w in after.values())
    worst = max(float(np.max(np.abs(w - dump[f"after.{n}"]))) for n, w in after.items())
    if not (loss_err <= TOL_LOSS and share <= TOL_MOVED):
        sys.exit(f"{peer.name}'s train step differs from ours: loss rel. error {loss_err:.3g} "
                 f"(≤ {TOL_LOSS:g}), {share:.3g} of weights moved differently (≤ {TOL_MOVED:g})")
    return {"loss_rel_err": loss_err, "max_abs_weight_diff": worst, "weights_moved_differently": share}


def prove(peer, what, reference, dump, args):
    """Checks the peer against `moe dump`, then warms it up; returns the JSON facts."""
    start = time.perf_counter()
    diff = float(np.max(np.abs(peer.logits() - reference)))
    if not diff <= TOL_LOGITS:
        sys.exit(f"{peer.name} computes a different function: "
                 f"max |logit difference| = {diff:.3g} > {TOL_LOGITS:g}")
    facts = {"max_abs_logit_diff": diff}
    if what == "train":
        facts |= check_step(peer, dump)
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        peer.run()
    # Checking and warming up include compilation (torch.compile, jax.jit).
    facts["first_calls_s"] = first
    facts["warmup_s"] = time.perf_counter() - start - first
    return facts


def measure(scenario, config_name, what, batch, seq, args, moe, work, peers):
    ckpt = checkpoint(moe, work, config_name)
    config = json.loads((ckpt / "config.json").read_text())
    params = load_file(ckpt / "model.safetensors")
    ids, targets = inputs(batch, seq)
    dump = our_dump(moe, work, ckpt, batch, seq)
    row = {"scenario": scenario, "config": config_name, "op": what, "batch": batch,
           "seq_len": seq, "results": {}}
    if "torch" in sys.modules:  # fresh torch.compile caches: no recompilation limit reached
        sys.modules["torch"]._dynamo.reset()
    runners = []
    for cls in peers:
        try:
            peer = cls(params, config, what, ids, targets)
        except NotImplementedError as e:
            row["results"][cls.name] = {"skipped": str(e)}
            continue
        row["results"][cls.name] = prove(peer, what, dump["logits"], dump, args)
        runners.append(peer)
    ours = RustPeer(moe, scenario, args.trials)
    times = {ours.name: []} | {p.name: [] for p in runners}
    everyone = [ours, *runners]
    for r in range(args.rounds):
        for who in everyone[r % len(everyone):] + everyone[:r % len(everyone)]:
            if who is ours:
                times[who.name] += ours.run_round()
                continue
            for _ in range(args.trials):
                start = time.perf_counter()
                who.run()
                times[who.name].append(time.perf_counter() - start)
    for name, ts in times.items():
        q1, med, q3 = quartiles(ts)
        row["results"].setdefault(name, {}).update(
            {"median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3, "trials": len(ts)})
    ours_med = row["results"][ours.name]["median_ms"]
    for name in times:
        row["results"][name]["ratio_to_ours"] = row["results"][name]["median_ms"] / ours_med
    best = min((n for n in times if n != ours.name), key=lambda n: row["results"][n]["median_ms"])
    row["best_peer"] = {"name": best, "median_ms": row["results"][best]["median_ms"],
                        "ratio_to_ours": row["results"][best]["ratio_to_ours"]}
    return row


def versions():
    import jax
    import torch

    return {"numpy": np.__version__, "torch": torch.__version__, "jax": jax.__version__,
            "python": sys.version.split()[0]}


def cpu_name():
    """The CPU's model name with its family and model numbers (a VM may name
    only the vendor's line, "AMD EPYC", for CPUs of different generations)."""
    info = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
        if not line.strip():
            break
    name = info.get("model name", "unknown CPU")
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def markdown(report):
    names = ["rosetta-moe", "NumPy", "PyTorch eager", "torch.compile", "torch.compile dense",
             "JAX jit"]
    lines = [
        "# rosetta-moe beside NumPy, PyTorch (eager and torch.compile) and JAX",
        "",
        f"Generated by `{report['command']}` on {report['date']}, "
        f"{report['cpu']}, one core pinned for every implementation"
        + (f"; `{report['moe_version']}`" if report.get("moe_version") else "") + ". "
        + (f"Every implementation capped to `{report['isa_cap']['MOE_SIMD']}` "
           f"(`{' '.join(f'{k}={v}' for k, v in report['isa_cap'].items())}`, and XLA's "
           "`--xla_cpu_max_isa`). " if report.get("isa_cap") else "")
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + f"; torch.compile mode `{report['torch_compile_mode']}`.",
        "",
        "Medians over interleaved rounds (IQR in brackets), milliseconds per run. "
        "Each peer's logits matched `moe dump`'s within 1e-4 before it was timed, and each "
        "training peer's first step matched our loss and updated weights. "
        "\"×\" is the peer's median over ours: how many times faster rosetta-moe is. "
        "**best peer** is the fastest peer of the row and rosetta-moe's speed-up over it.",
        "",
        "| scenario | op | " + " | ".join(names) + " | best peer |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for row in report["rows"]:
        cells = []
        for n in names:
            r = row["results"].get(n)
            if r is None or "median_ms" not in r:
                cells.append("—")
            elif n == "rosetta-moe":
                cells.append(f"{r['median_ms']:.3f} ({r['iqr_ms']:.3f})")
            else:
                cells.append(f"{r['median_ms']:.3f} ({r['iqr_ms']:.3f}) {r['ratio_to_ours']:.1f}×")
        best = row["best_peer"]
        cells.append(f"**{best['ratio_to_ours']:.2f}×** ({best['name']})")
        what = f"{row['config']} {row['op']} B{row['batch']} S{row['seq_len']}"
        lines.append(f"| `{row['scenario']}` | {what} | " + " | ".join(cells) + " |")
    lines += ["", "Compilation and first calls (excluded from the trials), seconds:", "",
              "| scenario | " + " | ".join(names[1:]) + " |", "|---|" + "---|" * (len(names) - 1)]
    for row in report["rows"]:
        cells = [f"{r['first_calls_s']:.2f}" if "first_calls_s" in (r := row["results"].get(n, {}))
                 else "—" for n in names[1:]]
        lines.append(f"| `{row['scenario']}` | " + " | ".join(cells) + " |")
    lines += ["", "What each peer does differently from rosetta-moe:", ""]
    lines += [f"- **{n}**: {note.format(mode=report['torch_compile_mode'])}"
              for n, note in PEER_NOTES.items()]
    lines += ["", "A training peer's check runs its first step from our initial weights at lr "
              f"{TRAIN['lr']:g} and compares the loss (relative error ≤ {TOL_LOSS:g}) and the "
              f"updated weights (at most {TOL_MOVED:g} of the entries may differ by more than lr/1000: "
              "AdamW's first step moves a weight by ≈ lr·sign(g), whichever way a rounding-level "
              "gradient points).", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", required=True, help="the moe binary")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per scenario")
    ap.add_argument("--trials", type=int, default=5, help="timed runs per implementation per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before the rounds")
    ap.add_argument("--scenario", default="",
                    help="only scenarios whose id contains one of these (comma-separated)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a short check of the machinery: {', '.join(QUICK['scenarios'])} "
                         f"(unless --scenario), {QUICK['rounds']} rounds of {QUICK['trials']} trials")
    ap.add_argument("--compile-mode", default=TORCH_COMPILE_MODE,
                    choices=["default", "max-autotune-no-cudagraphs", "max-autotune"],
                    help="mode of both torch.compile peers (routed and dense)")
    ap.add_argument("--json", help="write the results as JSON")
    ap.add_argument("--markdown", help="write the Markdown table")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.trials, args.warmup = QUICK["rounds"], QUICK["trials"], QUICK["warmup"]
    wanted = [s for s in args.scenario.split(",") if s]
    chosen = [spec for spec in SCENARIOS
              if (any(w in spec[0] for w in wanted) if wanted
                  else not args.quick or spec[0] in QUICK["scenarios"])]
    if not chosen:
        sys.exit(f"no scenario matches {args.scenario!r}: {', '.join(s[0] for s in SCENARIOS)}")
    TorchCompilePeer.mode = args.compile_mode
    peers = [NumPyPeer, TorchPeer, TorchCompilePeer, TorchCompileDensePeer, JaxPeer]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in chosen:
            print(f"{spec[0]}: checking and timing…", file=sys.stderr, flush=True)
            row = measure(*spec, args, args.moe, Path(tmp), peers)
            rows.append(row)
            summary = "  ".join(
                f"{n} {r['median_ms']:.3f} ms" + (f" ({r['ratio_to_ours']:.1f}×)" if n != "rosetta-moe" else "")
                for n, r in row["results"].items() if "median_ms" in r)
            print(f"  {summary}", file=sys.stderr, flush=True)
    report = {"command": "bench/peers/run " + " ".join(sys.argv[3:]).strip(),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpu": cpu_name(),
              "moe_version": " · ".join(subprocess.run([args.moe, "--version"], check=True,
                                                       capture_output=True, text=True).stdout.split("\n")).strip(" ·"),
              "isa_cap": {"MOE_SIMD": ISA_CAP, **ISA_CAPS.get(ISA_CAP, {})} if ISA_CAP else None,
              "versions": versions(), "torch_compile_mode": args.compile_mode,
              "rounds": args.rounds,
              "trials_per_round": args.trials, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
