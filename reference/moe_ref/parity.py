"""Parity of the Rust implementation against the JAX reference.

For every case it runs `moe init` and `moe dump` (the Rust side) and the
reference on the same weights and batch, and compares logits, losses, every
gradient, the routing and the weights after one AdamW step. The resume cases
instead run a short `moe train` and `moe dump --resume` on its checkpoint, so
that the AdamW step continues non-zero moments: the reference reads those
moments, the step count and the settings from the checkpoint files itself and
the weights *and* moments after the step are compared. One table row per case
and tensor group; the exit status is non-zero on any failure.

    python -m moe_ref.parity --moe target/release/moe [--x64] [--quick]
                             [--dump "COMMAND"] [--label NAME] [--case GLOB]

`--dump` checks another implementation (a Rosetta track): COMMAND is run in
place of `moe dump` with the same arguments (`--checkpoint DIR --batch FILE
--out FILE --step N --train FILE`, or `--resume DIR --batch FILE --out FILE`
for the resume cases) and must write the same tensors. The checkpoints the
resume cases continue always come from Rust's `moe train` (the `--moe`
binary): only the dump is the track's. `--case GLOB` runs only the cases whose
name matches (e.g. 'resume*').
"""

import argparse
import fnmatch
import itertools
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file

from . import model as ref

# Tolerances (see docs/verification.md for why).
TOL_LOGITS = 1e-5  # ‖a − b‖ / ‖b‖
TOL_LOSS = 1e-5  # |a − b| / |b|
TOL_GRAD = 1e-4  # ‖a − b‖ ≤ max(TOL_GRAD·‖b‖, GRAD_FLOOR·max_tensor ‖b‖)
GRAD_FLOOR = 1e-6
TOL_AFTER = 1e-6  # max |a − b| over every parameter
TOL_MOMENTS = 1e-6  # ‖a − b‖ / ‖b‖ per moment tensor, worst tensor

GQA = {
    "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
    "n_experts": 4, "top_k": 2, "ffn_dim": 256, "vocab_size": 1000, "max_seq_len": 512,
    "rope_base": 10000.0, "rope_alpha": 2.0,
}
LONG = {**GQA, "hidden_dim": 32, "head_dim": 8, "ffn_dim": 64, "vocab_size": 300, "max_seq_len": 96}


def cases(quick):
    """(name, config spec, B, S, seed, step, train overrides) for every case."""
    seeds = (1,) if quick else (1, 2, 3)
    steps = (1, 5, 100)  # inside warm-up (1, 5) and after it (100)
    out = []
    for (cfg_name, spec), batch, seq, seed in itertools.product(
        [("tiny", "tiny"), ("small", "small"), ("gqa", GQA)], (1, 3), (1, 7, 32), seeds
    ):
        step = steps[(seed + seq) % len(steps)]
        # Clipping (c = 1) is active whenever the gradient norm exceeds 1 — almost
        # always at initialisation; every third case turns it off instead.
        train = {"grad_clip": 0.0} if seed == 3 else {}
        if step == 100 and seq == 7:
            # A short schedule with another floor: lr_t is 0.64·lr, not 0.35·lr.
            train = {**train, "total_steps": 150, "min_lr_ratio": 0.5}
        out.append((f"{cfg_name} B{batch} S{seq} seed{seed}", spec, batch, seq, seed, step, train))
    out.append(("long S=max_seq_len", LONG, 2, LONG["max_seq_len"], 7, 20, {}))
    return out


# Resume cases: (name, `moe train` flags, B, S, seed of the dump's batch). Each
# trains a few steps from scratch on a fixed text (not the built-in corpus,
# which changes with the docs), saving every step, then takes one more AdamW
# step from the saved moments with `moe dump --resume`.
RESUME_CASES = [
    # t = 4 after a 3-step schedule: the cosine floor, with clipping (|g| ≈ 8).
    ("resume tiny t4", ["--config", "tiny", "--steps", "3", "--batch", "2", "--seq", "16"], 2, 16, 11),
    # t = 6 mid-cosine, no clipping, other β2, decay, lr and schedule floor.
    ("resume gqa t6 unclipped", ["--config", GQA, "--steps", "5", "--batch", "3", "--seq", "8",
                                 "--warmup", "2", "--schedule-steps", "12", "--lr", "3e-3",
                                 "--min-lr-ratio", "0.25", "--grad-clip", "0", "--beta2", "0.999",
                                 "--weight-decay", "0.05"], 1, 24, 12),
]


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"command failed: {' '.join(map(str, cmd))}\n{result.stderr}")


def write_batch(work, vocab, seed, batch, seq):
    """A random batch of ids and targets < vocab, as work/batch.json; returns (ids, targets)."""
    rng = np.random.default_rng(seed * 1000 + batch * 100 + seq)
    ids = rng.integers(0, vocab, size=(batch, seq))
    targets = rng.integers(0, vocab, size=(batch, seq))
    (work / "batch.json").write_text(json.dumps({"ids": ids.tolist(), "targets": targets.tolist()}))
    return ids, targets


def config_arg(work, spec):
    """A preset name as is, a config dict written to work/config.json."""
    if isinstance(spec, dict):
        path = work / "config.json"
        path.write_text(json.dumps(spec))
        return str(path)
    return spec


def rust_side(moe, dump_cmd, work, spec, batch, seq, seed, step, train):
    """Runs moe init + the dump command; returns (checkpoint dir, ids, targets, dump, train settings)."""
    ckpt = work / "ckpt"
    run([moe, "init", "--config", config_arg(work, spec), "--seed", str(seed), "--out", ckpt, "--force"])
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    ids, targets = write_batch(work, vocab, seed, batch, seq)
    settings = {**ref.DEFAULT_TRAIN, **train}
    (work / "train.json").write_text(json.dumps(settings))
    dump = work / "dump.safetensors"
    run([*dump_cmd, "--checkpoint", ckpt, "--batch", work / "batch.json", "--out", dump,
         "--step", str(step), "--train", work / "train.json"])
    return ckpt, ids, targets, load_file(dump), settings


def resume_side(moe, dump_cmd, work, flags, batch, seq, seed):
    """Runs a short `moe train` (always Rust's), then the dump command with
    `--resume` on its checkpoint; returns (run dir, ids, targets, dump)."""
    out, text = work / "run", work / "text.txt"
    words = np.random.default_rng(seed).choice(["the", "moe", "router", "expert", "token", "rope", "norm",
                                                "adamw", "step", "moment", "of", "a", "and", "is"], 6000)
    text.write_text(" ".join(words) + "\n")
    flags = [config_arg(work, f) for f in flags]
    run([moe, "train", *flags, "--data", text, "--save-every", "1", "--eval-batches", "1", "--out", out])
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    ids, targets = write_batch(work, vocab, seed, batch, seq)
    dump = work / "dump.safetensors"
    run([*dump_cmd, "--resume", out, "--batch", work / "batch.json", "--out", dump])
    return out, ids, targets, load_file(dump)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a))


def compare(ours, config, params, ids, targets, settings, step, moments=None):
    """Rows (group, error, tolerance, ok, detail) for one case; `moments` (m, v)
    are those the AdamW step continues (zero when None)."""
    (total, (ce, aux, logits, routes)), grads = ref.loss_and_grads(
        params, config, ids, targets, settings["aux_loss_alpha"]
    )
    rows = []
    err = rel(ours["logits"], logits)
    rows.append(("logits", err, TOL_LOGITS, err <= TOL_LOGITS, ""))
    err = max(rel(ours[f"loss.{n}"][0], v) for n, v in (("ce", ce), ("aux", aux), ("total", total)))
    rows.append(("loss ce/aux/total", err, TOL_LOSS, err <= TOL_LOSS, ""))

    norms = {n: float(np.linalg.norm(np.asarray(g, np.float64))) for n, g in grads.items()}
    floor = GRAD_FLOOR * max(norms.values())
    worst, worst_name, ok = 0.0, "", True
    for name, g in grads.items():
        diff = float(np.linalg.norm(np.asarray(ours[f"grad.{name}"], np.float64) - np.asarray(g, np.float64)))
        allowed = max(TOL_GRAD * norms[name], floor)
        score = diff / allowed * TOL_GRAD
        if score > worst:
            worst, worst_name = score, name
        ok &= diff <= allowed
    rows.append(("grads (worst tensor)", worst, TOL_GRAD, ok, worst_name))

    # An expert that received no token must have exactly zero gradient in ours.
    idle, idle_ok = 0, True
    for layer in range(config["n_layers"]):
        used = set(np.asarray(ours[f"route.{layer}"]).ravel().tolist())
        for e in set(range(config["n_experts"])) - used:
            idle += 1
            for w in ("gate_proj", "up_proj", "down_proj"):
                idle_ok &= not np.any(ours[f"grad.layers.{layer}.moe.experts.{e}.{w}.weight"])
    rows.append(("idle experts: zero grad", float(idle), 0.0, idle_ok, f"{idle} idle"))

    same = all(np.array_equal(ours[f"route.{l}"], np.asarray(r)) for l, r in enumerate(routes))
    rows.append(("routes", 0.0 if same else 1.0, 0.0, same, ""))

    # The optimizer step is checked from our own gradients: AdamW divides each
    # gradient by its own magnitude, so entries whose gradient is at float32
    # rounding level (|g| near eps after clipping) move by up to lr whatever
    # their sign — the end-to-end difference is shown, but does not gate.
    our_grads = {name: ours[f"grad.{name}"] for name in params}
    for label, source, gating in (("after AdamW (our grads)", our_grads, True),
                                  ("after AdamW (ref grads)", grads, False)):
        after, (m, v), norm = ref.adamw_step(params, source, step, settings, moments)
        worst = max(float(np.max(np.abs(np.asarray(ours[f"after.{n}"], np.float64) - np.asarray(p, np.float64))))
                    for n, p in after.items())
        clipped = settings["grad_clip"] > 0 and norm > settings["grad_clip"]
        detail = f"step {step}, {'clipped' if clipped else 'unclipped'} (|g| {norm:.3g})"
        if not gating:
            rows.append((label, worst, float("nan"), True, "informational, see docs/verification.md"))
            continue
        rows.append((label, worst, TOL_AFTER, worst <= TOL_AFTER, detail))
        if moments is not None:
            worst, worst_name = max((rel(ours[f"{k}_after.{n}"], x[n]), f"{k}.{n}")
                                    for k, x in (("m", m), ("v", v)) for n in params)
            rows.append(("moments after (worst)", worst, TOL_MOMENTS, worst <= TOL_MOMENTS, worst_name))
    return rows


def resume_rows(ours, moments):
    """The dump must have started from the checkpoint's moments, bit for bit."""
    same = all(np.array_equal(ours[f"{k}.{n}"], np.asarray(x[n], np.float32))
               for k, x in zip("mv", moments) for n in x)
    nonzero = all(np.any(np.asarray(x[n])) for x in moments for n in x)
    ok = same and nonzero
    return [("moments before = ckpt's", 0.0 if ok else 1.0, 0.0, ok, "all non-zero" if nonzero else "some zero")]


def print_rows(name, rows):
    """Prints a case's rows; returns the number of failures."""
    failures = 0
    for group, err, tol, ok, detail in rows:
        failures += not ok
        tol_text = f"{tol:10.0e}" if tol == tol else f"{'-':>10}"
        result = "info" if tol != tol else "ok" if ok else "FAIL"
        print(f"{name:28} {group:26} {err:10.2e} {tol_text}  {result:6}  {detail}", flush=True)
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe", default="target/release/moe", help="the moe binary")
    parser.add_argument("--x64", action="store_true", help="run the reference in float64")
    parser.add_argument("--quick", action="store_true", help="one seed per shape")
    parser.add_argument("--dump", metavar="COMMAND",
                        help="the dump command to check (default: MOE dump), split like a shell line")
    parser.add_argument("--label", default="rust", help="name of the implementation in the summary")
    parser.add_argument("--case", default="*", metavar="GLOB", help="only the cases whose name matches")
    args = parser.parse_args()
    dump_cmd = shlex.split(args.dump) if args.dump else [args.moe, "dump"]
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = np.float64 if args.x64 else np.float32

    failures, start = 0, time.time()
    print(f"{'case':28} {'group':26} {'error':>10} {'tolerance':>10}  result  detail")
    for name, spec, batch, seq, seed, step, train in cases(args.quick):
        if not fnmatch.fnmatch(name, args.case):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, ids, targets, ours, settings = rust_side(args.moe, dump_cmd, Path(tmp), spec, batch, seq, seed, step, train)
            config, params = ref.load_checkpoint(ckpt, dtype)
        failures += print_rows(name, compare(ours, config, params, ids, targets, settings, step))
    for name, flags, batch, seq, seed in RESUME_CASES:
        if not fnmatch.fnmatch(name, args.case):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out, ids, targets, ours = resume_side(args.moe, dump_cmd, Path(tmp), flags, batch, seq, seed)
            config, params, moments, done, settings = ref.load_training(out, dtype)
        rows = resume_rows(ours, moments) + compare(ours, config, params, ids, targets, settings, done + 1, moments)
        failures += print_rows(name, rows)
    verdict = "all cases agree" if failures == 0 else f"{failures} failures"
    print(f"\n{args.label}: {verdict} ({time.time() - start:.0f} s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
