"""rosetta-moe beside NumPy, PyTorch eager and JAX jit: the same model, the same
weights, the same inputs, timed in interleaved rounds on one core.

Every peer first proves it computes our function: its logits on the scenario's
batch must be within 1e-4 of `moe dump`'s on the same checkpoint. Then, round
after round, each implementation runs a few trials in turn (the order rotates),
so that drift of this noisy machine hits all of them alike. We report medians
and interquartile ranges of the per-run times and the ratio of medians.

The peers are plain, idiomatic versions of CONTRACT §3–§4 and §6:
  * NumPy: forward only (it has no autograd), experts on their routed tokens.
  * PyTorch eager: forward; train step = loss.backward(), clip_grad_norm_,
    torch.optim.AdamW (decay on matrices only, as §6).
  * JAX jit: the reference model of reference/moe_ref (every expert on every
    token — jit needs static shapes — so it does E/k× the expert work), train
    step = value_and_grad + clipping + AdamW in one jitted function.
"""

import os

# One core, one thread, for every implementation (set before the imports).
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
os.environ["JAX_PLATFORMS"] = "cpu"

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
TRAIN = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
         "grad_clip": 1.0, "aux_loss_alpha": 0.01}


def inputs(batch, seq):
    """The inputs of `moe bench`: ids i mod 1000, targets (i + 1) mod 1000."""
    i = np.arange(batch * seq)
    return (i % 1000).reshape(batch, seq), ((i + 1) % 1000).reshape(batch, seq)


def rope_tables(config, seq):
    """cos θ, sin θ [S, d/2] in float64 (CONTRACT §3, NTK-scaled base when α > 1)."""
    d, base, alpha = config["head_dim"], config["rope_base"], config["rope_alpha"]
    if alpha > 1:
        base = base * alpha ** (d / (d - 2))
    angles = np.arange(seq)[:, None] * base ** (-2.0 * np.arange(d // 2) / d)[None, :]
    return np.cos(angles), np.sin(angles)


# ---------------------------------------------------------------- NumPy

def numpy_forward(p, config, ids):
    """Logits [B, S, V] of ids [B, S]."""
    B, S = ids.shape
    h, H, Hkv, d = config["hidden_dim"], config["n_heads"], config["n_kv_heads"], config["head_dim"]
    E, k = config["n_experts"], config["top_k"]
    cos, sin = (t.astype(np.float32)[None, :, None, :] for t in rope_tables(config, S))
    causal = np.tril(np.ones((S, S), dtype=bool))

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
        self.params, self.config, self.ids = params, config, ids

    def logits(self):
        return numpy_forward(self.params, self.config, self.ids)

    def run(self):
        numpy_forward(self.params, self.config, self.ids)


# ---------------------------------------------------------------- PyTorch

def torch_loss(torch, p, config, ids, targets, alpha):
    """(total loss, logits) of ids [B, S] (tensors), CE + α·E·Σ_l Σ_e f_e·P_e."""
    F = torch.nn.functional
    B, S = ids.shape
    h, H, Hkv, d = config["hidden_dim"], config["n_heads"], config["n_kv_heads"], config["head_dim"]
    E, k = config["n_experts"], config["top_k"]
    cos, sin = (torch.tensor(t, dtype=torch.float32)[None, :, None, :] for t in rope_tables(config, S))
    causal = torch.ones(S, S, dtype=torch.bool).tril()

    def norm(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS))

    def rope(x):
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)

    x = p["embed.weight"][ids]
    aux = 0.0
    for l in range(config["n_layers"]):
        w = lambda name: p[f"layers.{l}.{name}.weight"]
        xn = norm(x, w("attn_norm"))
        q = rope((xn @ w("attn.q_proj").T).view(B, S, H, d))
        kk = rope((xn @ w("attn.k_proj").T).view(B, S, Hkv, d))
        v = (xn @ w("attn.v_proj").T).view(B, S, Hkv, d)
        kk, v = kk.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bshd,bthd->bhst", q, kk) / math.sqrt(d)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        x = x + torch.einsum("bhst,bthd->bshd", att, v).reshape(B, S, H * d) @ w("attn.o_proj").T
        xn = norm(x, w("moe_norm")).reshape(B * S, h)
        probs = torch.softmax(xn @ w("moe.router").T, dim=-1)
        top, chosen = torch.topk(probs, k, dim=-1)
        gates = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(xn)
        for e in range(E):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                ex = lambda name: w(f"moe.experts.{e}.{name}")
                xe = xn[rows]
                act = F.silu(xe @ ex("gate_proj").T) * (xe @ ex("up_proj").T)
                out = out.index_add(0, rows, gates[rows, slot][:, None] * (act @ ex("down_proj").T))
        x = x + out.view(B, S, h)
        f = torch.bincount(chosen.flatten(), minlength=E).to(xn.dtype) / (B * S * k)
        aux = aux + alpha * E * torch.sum(f * probs.mean(0))
    logits = norm(x, p["final_norm.weight"]) @ p["lm_head.weight"].T
    ce = F.cross_entropy(logits.reshape(B * S, -1), targets.reshape(-1))
    return ce + aux, logits


class TorchPeer:
    name = "PyTorch"

    def __init__(self, params, config, what, ids, targets):
        import torch

        torch.set_num_threads(1)
        self.torch, self.config, self.what = torch, config, what
        self.p = {n: torch.tensor(v, requires_grad=what == "train") for n, v in params.items()}
        self.ids, self.targets = torch.tensor(ids), torch.tensor(targets)
        if what == "train":
            matrices = [t for t in self.p.values() if t.ndim == 2]
            vectors = [t for t in self.p.values() if t.ndim != 2]
            self.opt = torch.optim.AdamW(
                [{"params": matrices, "weight_decay": TRAIN["weight_decay"]},
                 {"params": vectors, "weight_decay": 0.0}],
                lr=TRAIN["lr"], betas=(TRAIN["beta1"], TRAIN["beta2"]), eps=TRAIN["eps"])

    def logits(self):
        with self.torch.no_grad():
            return self._loss()[1].numpy()

    def _loss(self):
        return torch_loss(self.torch, self.p, self.config, self.ids, self.targets,
                          TRAIN["aux_loss_alpha"])

    def run(self):
        if self.what == "forward":
            with self.torch.no_grad():
                self._loss()
            return
        self.opt.zero_grad(set_to_none=True)
        self._loss()[0].backward()
        self.torch.nn.utils.clip_grad_norm_(self.p.values(), TRAIN["grad_clip"])
        self.opt.step()


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
            grads = jax.grad(lambda q: model.loss(q, config, ids, targets, alpha)[0])(p)
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads.values()))
            scale = jnp.minimum(1.0, TRAIN["grad_clip"] / (norm + 1e-6))
            b1, b2, lr = TRAIN["beta1"], TRAIN["beta2"], TRAIN["lr"]
            out = ({}, {}, {})
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
        if self.what == "forward":
            self.forward(self.p, self.ids).block_until_ready()
            return
        self.t += 1
        self.p, self.m, self.v = self.step(self.p, self.m, self.v, float(self.t),
                                           self.ids, self.targets)
        self.jax.block_until_ready(self.p)


# ---------------------------------------------------------------- rosetta-moe

class RustPeer:
    """`moe bench --child ID`: our own suite's measurement of the scenario."""
    name = "rosetta-moe"

    def __init__(self, moe, scenario, trials):
        self.moe, self.scenario, self.trials = moe, scenario, trials
        self.batch_times = []

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


def our_logits(moe, work, ckpt, batch, seq):
    ids, targets = inputs(batch, seq)
    batch_file = work / f"batch_{batch}_{seq}.json"
    batch_file.write_text(json.dumps({"ids": ids.tolist(), "targets": targets.tolist()}))
    dump = work / f"dump_{ckpt.name}_{batch}_{seq}.safetensors"
    subprocess.run([moe, "dump", "--checkpoint", str(ckpt), "--batch", str(batch_file),
                    "--out", str(dump)], check=True, capture_output=True)
    return load_file(dump)["logits"]


def measure(scenario, config_name, what, batch, seq, args, moe, work, peers):
    ckpt = checkpoint(moe, work, config_name)
    config = json.loads((ckpt / "config.json").read_text())
    params = load_file(ckpt / "model.safetensors")
    ids, targets = inputs(batch, seq)
    reference = our_logits(moe, work, ckpt, batch, seq)
    row = {"scenario": scenario, "config": config_name, "op": what, "batch": batch,
           "seq_len": seq, "results": {}}
    runners = []
    for cls in peers:
        try:
            peer = cls(params, config, what, ids, targets)
        except NotImplementedError as e:
            row["results"][cls.name] = {"skipped": str(e)}
            continue
        diff = float(np.max(np.abs(peer.logits() - reference)))
        if not diff <= 1e-4:
            sys.exit(f"{cls.name} computes a different function on {scenario}: "
                     f"max |logit difference| = {diff:.3g} > 1e-4")
        for _ in range(args.warmup):
            peer.run()
        row["results"][cls.name] = {"max_abs_logit_diff": diff}
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
    return row


def versions():
    import jax
    import torch

    return {"numpy": np.__version__, "torch": torch.__version__, "jax": jax.__version__,
            "python": sys.version.split()[0]}


def markdown(report):
    names = ["rosetta-moe", "NumPy", "PyTorch", "JAX jit"]
    lines = [
        "# rosetta-moe beside NumPy, PyTorch and JAX",
        "",
        f"Generated by `{report['command']}` on {report['date']}, "
        f"{report['cpu']}, one core pinned for every implementation. "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "Medians over interleaved rounds (IQR in brackets), milliseconds per run. "
        "Each peer's logits matched `moe dump`'s within 1e-4 before it was timed. "
        "\"×\" is the peer's median over ours: how many times faster rosetta-moe is.",
        "",
        "| scenario | op | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
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
        what = f"{row['config']} {row['op']} B{row['batch']} S{row['seq_len']}"
        lines.append(f"| `{row['scenario']}` | {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Notes: NumPy has no autograd, so it runs forwards only. The JAX peer is the",
        "reference model of `reference/moe_ref`, which runs every expert on every token",
        "(jit needs static shapes), E/k = 2× the expert FLOPs of the others. PyTorch is",
        "eager (no torch.compile), with `torch.set_num_threads(1)`.",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", required=True, help="the moe binary")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per scenario")
    ap.add_argument("--trials", type=int, default=5, help="timed runs per implementation per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before the rounds")
    ap.add_argument("--scenario", default="", help="only scenarios whose id contains this")
    ap.add_argument("--json", help="write the results as JSON")
    ap.add_argument("--markdown", help="write the Markdown table")
    args = ap.parse_args()
    peers = [NumPyPeer, TorchPeer, JaxPeer]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in SCENARIOS:
            if args.scenario not in spec[0]:
                continue
            print(f"{spec[0]}: checking and timing…", file=sys.stderr, flush=True)
            row = measure(*spec, args, args.moe, Path(tmp), peers)
            rows.append(row)
            summary = "  ".join(
                f"{n} {r['median_ms']:.3f} ms" + (f" ({r['ratio_to_ours']:.1f}×)" if n != "rosetta-moe" else "")
                for n, r in row["results"].items() if "median_ms" in r)
            print(f"  {summary}", flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               "unknown CPU")
    report = {"command": "bench/peers/run " + " ".join(sys.argv[3:]).strip(),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpu": cpu,
              "versions": versions(), "rounds": args.rounds, "trials_per_round": args.trials,
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
