"""Time to quality: torch.compile trains our model with our recipe for the same
wall-clock budget as `moe train --recipe R --time T`, and our own scorer
(`moe eval`) gives its validation bits per byte.

The strongest PyTorch peer of bench/peers (torch.compile, routed experts, fused
AdamW; see peers.py) on every core, with the recipe's model, data, split,
optimizer, schedule and initial weights:

  * tokenizer: `moe train --data TEXT --config MODEL --steps 1` trains ours
    (byte-level BPE, written as a Hugging Face tokenizer.json), which is
    loaded with the `tokenizers` package; the text is encoded as ours does
    (valid UTF-8 runs through the BPE, each invalid byte its byte token) and
    split as src/data.rs does: the first floor(0.9·n) tokens train, the rest
    validate. The token count is checked against the one `moe train` prints.
  * weights: `moe init --config MODEL --seed SEED`, the very weights
    `moe train --recipe R --seed SEED` starts from.
  * proof, before anything is timed: on the first training batch, the peer's
    logits must be within 1e-4 of `moe dump`'s, and its first AdamW step
    (the recipe's β2, weight decay, clipping and α, at peers.py's constant
    lr 1e-3) must give our loss within 1e-5 (relative) and our updated
    weights (peers.check_step).
  * training: loss = CE + α·E·Σ_l Σ_e f_e·P_e (peers.torch_loss; with the
    recipe's residual dropout, torch's F.dropout on each attention and MoE
    output before it joins the residual — the same rate, other masks), backward,
    clip_grad_norm_, AdamW(fused=True) with betas (0.9, β2), eps 1e-8,
    decay on 2-D weights only (CONTRACT §6); batches of `batch` random
    windows of seq + 1 tokens of the training split; learning rate: linear
    warm-up, then cosine to min_lr_ratio·lr, the schedule's length refitted
    before every step to the budget as src/budget.rs does (the steps that
    still fit at the mean pace measured since the first timed step), so the
    rate reaches its floor as the time runs out (at most one step over).
  * compilation is not on the clock: the proof step and two more warm-up
    steps run on a throwaway copy of the weights and optimizer (compiling the
    forward and the AOTAutograd backward); the clock starts with fresh
    weights from the checkpoint, a fresh optimizer and step 1.
  * scoring: the trained weights are saved as our checkpoint (config.json,
    model.safetensors with our names, f32, and the tokenizer.json) and
    `moe eval` scores the validation text (the validation tokens decoded
    back to bytes); the same figure is computed in torch (eval.rs's windows)
    as a cross-check. With --ours RUN, our own run's checkpoint is scored on
    the same file by the same command.

What differs from `moe train`: the sampler draws other windows (NumPy's PCG64
seeded with SEED, not our ChaCha8); the clock counts only training steps,
while ours also pays for an evaluation every 100 steps (16 forward passes)
and its checkpoint saves, and keeps a reserve for its final evaluation — a
few percent more steps for the peer; `moe train`'s own end-of-run bits/byte
comes from 8 validation batches, not the whole split, so compare `moe eval`
figures (--ours). Float rounding differs (the proof bounds it per step).
"""

import os

ALL_CORES = os.sched_getaffinity(0)  # before peers.py pins us to one core

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from sweep import cpu_model  # noqa: E402  (standard library only)
RECIPE_KEYS = {"about", "model", "steps", "time", "batch", "seq", "lr", "warmup",
               "min_lr_ratio", "weight_decay", "grad_clip", "beta2", "aux_alpha", "dropout"}
RECIPE_DEFAULTS = {"warmup": 100, "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0,
                   "beta2": 0.95, "aux_alpha": 0.01, "dropout": 0.0}
TRAIN_FRACTION = 0.9  # src/data.rs
WARMUP_STEPS = 3  # untimed steps on the throwaway copy (the proof step included)
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "secs": 1,
         "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60,
         "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
         "d": 86400, "day": 86400, "days": 86400}


def fail(message):
    sys.exit(f"time_to_quality: error: {message}")


def say(message):
    print(message, file=sys.stderr, flush=True)


def parse_duration(text):
    """Seconds of "90", "90s", "15m", "1h30m" or "1m 30s" (humantime's units)."""
    text = str(text).strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-zµ]+)", text)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([a-zµ]+)|\s", "", text):
            raise ValueError(f"{text!r} is not a duration (e.g. 90, 90s, 15m, 1h30m)")
        seconds = 0.0
        for number, unit in parts:
            if unit not in UNITS:
                raise ValueError(f"unknown unit {unit!r} in {text!r}")
            seconds += float(number) * UNITS[unit]
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"the budget must be longer than zero, not {text!r}")
    return seconds


def load_recipe(path):
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read recipe {path}: {e}")
    if not isinstance(recipe, dict):
        fail(f"recipe {path}: expected a JSON object")
    unknown = set(recipe) - RECIPE_KEYS
    missing = {"model", "batch", "seq", "lr"} - set(recipe)
    if unknown or missing:
        fail(f"recipe {path}: " + "; ".join(
            [f"unknown keys {sorted(unknown)}"] * bool(unknown)
            + [f"missing keys {sorted(missing)}"] * bool(missing)))
    return {**RECIPE_DEFAULTS, **recipe}


def run(cmd, what):
    """Runs one of our commands; its stdout (and stderr) on success, else a clear exit."""
    try:
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    except OSError as e:
        fail(f"{what}: cannot run {cmd[0]}: {e}")
    if out.returncode != 0:
        fail(f"{what} failed (exit {out.returncode}): {' '.join(map(str, cmd))}\n{out.stderr.strip()}")
    return out.stdout, out.stderr


# ---------------------------------------------------------------- tokenizer

def byte_to_unicode():
    """GPT-2's byte → character map of byte-level BPE (src/tokenizer.rs)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table, rank = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + rank)
            rank += 1
    return table


class ByteTokenizer:
    """Our tokenizer.json through the `tokenizers` package, with ours' byte
    semantics: encode any bytes, decode = the tokens' bytes concatenated."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.inner = Tokenizer.from_file(str(path))
        to_byte = {c: b for b, c in byte_to_unicode().items()}
        vocab = self.inner.get_vocab(with_added_tokens=False)
        self.token_bytes = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            try:
                self.token_bytes[i] = bytes(to_byte[c] for c in token)
            except KeyError:
                fail(f"{path}: token {token!r} is not byte-level")
        self.byte_token = [vocab[byte_to_unicode()[b]] for b in range(256)]

    def encode(self, data):
        """Ids of any bytes: valid UTF-8 runs through the BPE, invalid bytes as
        their byte tokens (as src/tokenizer.rs `encode`)."""
        ids, at = [], 0
        while at < len(data):
            try:
                valid, bad = data[at:].decode("utf-8"), b""
                at = len(data)
            except UnicodeDecodeError as e:
                valid, bad = data[at:at + e.start].decode("utf-8"), data[at + e.start:at + e.end]
                at += e.end
            if valid:
                ids += self.inner.encode(valid, add_special_tokens=False).ids
            ids += [self.byte_token[b] for b in bad]
        return ids

    def decode(self, ids):
        return b"".join(self.token_bytes[i] for i in ids)


# ---------------------------------------------------------------- schedule (src/budget.rs)

class TimeBudget:
    """The schedule fitted to a wall-clock budget, as src/budget.rs (no
    reserve: the peer neither evaluates nor saves while the clock runs)."""

    def __init__(self, seconds):
        self.budget, self.first, self.latest = seconds, None, None

    def record(self, step, clock):
        self.first = self.first or (step, clock)
        self.latest = (step, clock)

    def seconds_per_step(self):
        if self.first and self.latest and self.latest[0] > self.first[0]:
            return max(self.latest[1] - self.first[1], 0.0) / (self.latest[0] - self.first[0])
        return None

    def plan(self, step, clock, unknown):
        """The schedule length ending at the last step that fits, or None (stop)."""
        left = self.budget - clock
        per = self.seconds_per_step()
        if per is None or per <= 0:
            if left > 0:
                return max(unknown, step + 1)
            fits = 0
        else:
            fits = math.floor(left / per)
        return None if fits < 1 else step + fits

    def schedule_for_next(self, step, clock, current):
        total = self.plan(step, clock, current)
        return step + 1 if total is None else total

    def ends_after(self, step, clock, total):
        return step >= total and self.plan(step, clock, total) is None


def learning_rate(recipe, t, total):
    """CONTRACT §6: linear warm-up, then cosine to min_lr_ratio·lr (src/optim.rs)."""
    lr, warmup = recipe["lr"], recipe["warmup"]
    if t <= warmup:
        return lr * t / warmup
    progress = min(1.0, (t - warmup) / (total - warmup)) if total > warmup else 1.0
    floor = recipe["min_lr_ratio"] * lr
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- evaluation (src/eval.rs)

def window_starts(n, seq, stride):
    last_target, starts, begin = max(n - 1, 0), [0], 0
    while begin + seq < last_target:
        begin += stride
        starts.append(begin)
    return starts


def torch_eval(torch, peers, p, config, tokens, bytes_of, seq):
    """src/eval.rs `evaluate` with stride = seq: every token after the first
    scored once, by windows of at most seq tokens, batch 1 (eager)."""
    cos_all, sin_all = (torch.from_numpy(t) for t in peers.rope_tables(config, seq))
    nats, scored, nbytes, done_until = 0.0, 0, 0, 0
    starts = window_starts(len(tokens), seq, seq)
    with torch.inference_mode():
        for begin in starts:
            end = min(begin + seq, len(tokens) - 1)
            S = end - begin
            ids = torch.tensor(tokens[begin:end], dtype=torch.int64)[None]
            causal = torch.ones(S, S).tril() > 0
            logits, _ = peers.torch_forward(torch, p, config, ids, cos_all[:, :S], sin_all[:, :S],
                                            causal, False, False)
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            first = max(done_until + 1 - (begin + 1), 0)  # positions whose target is new
            targets = tokens[begin + 1 + first:end + 1]
            nats -= float(logp[torch.arange(first, S), torch.tensor(targets)].sum())
            nbytes += sum(bytes_of(t) for t in targets)
            scored += len(targets)
            done_until = end
    loss = nats / scored
    return {"tokens": scored, "bytes": nbytes, "windows": len(starts), "loss": loss,
            "bits_per_byte": nats / math.log(2) / max(nbytes, 1)}


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(
        description="torch.compile trains the recipe's model for the same wall-clock budget as "
                    "`moe train --recipe R --time T`; `moe eval` scores its validation bits/byte.",
        epilog="The module docstring (head of this file) lists what differs from `moe train`.")
    ap.add_argument("--recipe", required=True, metavar="FILE",
                    help="recipe JSON (configs/*.json keys: model, batch, seq, lr, warmup, "
                         "min_lr_ratio, weight_decay, grad_clip, beta2, aux_alpha, dropout, steps|time)")
    ap.add_argument("--time", metavar="SECONDS",
                    help="wall-clock training budget, seconds or a duration like 90s, 15m "
                         "[default: the recipe's time]")
    ap.add_argument("--moe", default=str(ROOT / "target/release/moe"), metavar="PATH",
                    help="our binary [default: target/release/moe]")
    ap.add_argument("--text", default=str(ROOT / "data/tinyshakespeare.txt"), metavar="FILE",
                    help="training text (split 90/10 as `moe train` does) "
                         "[default: data/tinyshakespeare.txt]")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="where to write the trained checkpoint (config.json, model.safetensors, "
                         "tokenizer.json): scored by `moe eval`, loadable by every moe command")
    ap.add_argument("--work", metavar="DIR",
                    help="scratch directory (tokenizer run, init checkpoint, proof dump, "
                         "validation text val.txt) [default: OUT.work]")
    ap.add_argument("--json", metavar="FILE", help="write the result as JSON here")
    ap.add_argument("--seed", type=int, default=42,
                    help="seed of the initial weights (`moe init`) and of the window sampler "
                         "[default: 42, as `moe train`]")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch intra-op threads (the process may use every core) [default: 2]")
    ap.add_argument("--eval-seq", type=int, metavar="N",
                    help="tokens per `moe eval` window [default: moe eval's own: the model's "
                         "max_seq_len, at most 256]")
    ap.add_argument("--ours", metavar="RUN",
                    help="also score this checkpoint (e.g. the `moe train --recipe R --time T "
                         "--out RUN` being compared) with `moe eval` on the same validation text")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    try:
        if args.time is not None:
            budget = parse_duration(args.time)
        elif "time" in recipe:
            budget = parse_duration(recipe["time"])
        else:
            fail(f"recipe {args.recipe} counts steps ({recipe.get('steps')}), not time: give --time")
    except ValueError as e:
        fail(f"--time / recipe time: {e}")
    if args.threads < 1:
        fail("--threads must be ≥ 1")
    moe, text_path, out = Path(args.moe), Path(args.text), Path(args.out)
    if not (moe.is_file() and os.access(moe, os.X_OK)):
        fail(f"--moe {moe}: no such executable (build it with `cargo build --release`)")
    try:
        text = text_path.read_bytes()
    except OSError as e:
        fail(f"--text: {e}")
    if not text:
        fail(f"--text {text_path} is empty")
    if out.exists() and any(out.iterdir()) and not args.force:
        fail(f"--out {out} is not empty (pass --force to overwrite)")
    if args.ours and not Path(args.ours, "model.safetensors").exists():
        fail(f"--ours {args.ours}: no model.safetensors there")
    work = Path(args.work) if args.work else Path(str(out).rstrip("/") + ".work")
    work.mkdir(parents=True, exist_ok=True)
    model_cfg = recipe["model"]
    B, S = int(recipe["batch"]), int(recipe["seq"])

    # peers.py pins the process to one core and sets *_NUM_THREADS=1 at import:
    # undo both before torch is imported.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    import peers

    os.sched_setaffinity(0, ALL_CORES)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    from safetensors.numpy import load_file, save_file
    import torch
    import tokenizers

    # 1. Initial weights and tokenizer, from our binary.
    config_file = work / "config.json"
    config_file.write_text(json.dumps(model_cfg, indent=2) + "\n")
    say(f"moe init (seed {args.seed}) and our tokenizer (moe train --steps 1)…")
    run([moe, "init", "--config", config_file, "--seed", args.seed, "--out", work / "init",
         "--force"], "moe init")
    config = json.loads((work / "init/config.json").read_text())
    params = load_file(work / "init/model.safetensors")
    _, train_log = run([moe, "train", "--data", text_path, "--config", config_file, "--steps", 1,
                        "--batch", B, "--seq", S, "--out", work / "tok", "--threads", 1, "--force",
                        "--json"], "moe train (for its tokenizer)")
    tok = ByteTokenizer(work / "tok/tokenizer.json")

    # 2. Tokens and the 90/10 split of src/data.rs.
    ids = tok.encode(text)
    n = len(ids)
    cut = int(n * TRAIN_FRACTION)
    train_ids, val_ids = np.array(ids[:cut], dtype=np.int64), ids[cut:]
    counted = re.search(r"\((\d+) train / (\d+) val tokens\)", train_log)
    if counted is None:
        say("warning: `moe train` did not print its token counts; split not cross-checked")
    elif (int(counted[1]), int(counted[2])) != (cut, n - cut):
        fail(f"our split has {counted[1]} train / {counted[2]} val tokens, this script's "
             f"{cut} / {n - cut}: the tokenizers package encodes differently")
    if min(cut, n - cut) < S + 1:
        fail(f"{n} tokens: each split needs at least seq + 1 = {S + 1}")
    round_trip = tok.decode(ids) == text
    if round_trip:
        val_text = tok.decode(val_ids)
    else:
        # The text after the 90 % token boundary, by the tokenizer's offsets.
        say("warning: decode(encode(text)) != text; validation text taken from the byte "
            "offset of the 90 % token boundary")
        try:
            chars = text.decode("utf-8")
            offsets = tok.inner.encode(chars, add_special_tokens=False).offsets
            boundary = len(chars[:offsets[cut][0]].encode("utf-8"))
        except (UnicodeDecodeError, IndexError):  # invalid bytes: sum the tokens' lengths
            boundary = len(tok.decode(ids[:cut]))
        val_text = text[boundary:]
    val_file = work / "val.txt"
    val_file.write_bytes(val_text)
    say(f"{n} tokens ({cut} train / {n - cut} val, as `moe train`), round trip "
        f"{'exact' if round_trip else 'NOT exact'}, {len(val_text)} validation bytes in {val_file}")

    # 3. Proof on the first training batch, compiling the step (untimed).
    for key, ours in [("weight_decay", "weight_decay"), ("beta2", "beta2"),
                      ("grad_clip", "grad_clip"), ("aux_loss_alpha", "aux_alpha")]:
        peers.TRAIN[key] = float(recipe[ours])
    peers.TorchCompilePeer.mode = peers.TORCH_COMPILE_MODE

    def sampler():
        rng = np.random.default_rng(args.seed)
        offsets = np.arange(S + 1)
        while True:  # starts in [0, len − seq), as src/data.rs WindowSampler
            windows = train_ids[rng.integers(0, len(train_ids) - S, size=B)[:, None] + offsets]
            yield np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    proof_ids, proof_targets = next(sampler())
    batch_file, train_file = work / "proof_batch.json", work / "proof_train.json"
    batch_file.write_text(json.dumps({"ids": proof_ids.tolist(), "targets": proof_targets.tolist()}))
    train_file.write_text(json.dumps(peers.TRAIN))
    dump_file = work / "proof_dump.safetensors"
    say("moe dump of the first batch; proving the peer (compiles the step)…")
    run([moe, "dump", "--checkpoint", work / "init", "--batch", batch_file, "--train", train_file,
         "--out", dump_file], "moe dump")
    dump = load_file(dump_file)
    peer = peers.TorchCompilePeer(params, config, "train", proof_ids, proof_targets)
    torch.set_num_threads(args.threads)  # TorchPeer set one
    from torch._dynamo.utils import counters

    cos, sin = (torch.from_numpy(t) for t in peers.rope_tables(config, S))
    causal = torch.ones(S, S).tril() > 0

    def train_step(p, opt, x, y, lr):
        """One step of the timed loop; the loss as a float."""
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = peer.loss(p, torch.from_numpy(x), torch.from_numpy(y), cos, sin, causal,
                         recipe["dropout"])[0]
        loss.backward()
        if recipe["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(p.values(), recipe["grad_clip"])
        opt.step()
        return float(loss.detach())

    compiling = time.perf_counter()
    proof = peers.prove(peer, "train", dump["logits"], dump, SimpleNamespace(warmup=0))
    del proof["warmup_s"]
    # The other warm-up steps: the timed loop's own code on the throwaway copy.
    warm = sampler()
    for _ in range(WARMUP_STEPS - 1):
        train_step(peer.p, peer.opt, *next(warm), peers.TRAIN["lr"])
    compile_s = time.perf_counter() - compiling
    say(f"proved: max |logit diff| {proof['max_abs_logit_diff']:.3g}, loss rel. error "
        f"{proof['loss_rel_err']:.3g}, {proof['weights_moved_differently']:.3g} of weights moved "
        f"differently; compile + {WARMUP_STEPS} warm-up steps {compile_s:.1f} s (not timed)")
    graphs_before = counters["stats"]["unique_graphs"]

    # 4. Training against the clock, from fresh weights and a fresh optimizer.
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(
        [{"params": [t for t in p.values() if t.ndim == 2], "weight_decay": recipe["weight_decay"]},
         {"params": [t for t in p.values() if t.ndim != 2], "weight_decay": 0.0}],
        lr=learning_rate(recipe, 1, 1), betas=(0.9, recipe["beta2"]), eps=1e-8, fused=True)
    batches = sampler()
    timer = TimeBudget(budget)
    total = max(10 * recipe["warmup"], 1000)  # until the pace is known, as ours
    losses, done, next_log = [], 0, 0.1
    say(f"training for {budget:g} s on {args.threads} thread(s)…")
    start = time.perf_counter()
    while True:
        clock = time.perf_counter() - start
        total = timer.schedule_for_next(done, clock, total)
        step = done + 1
        lr = learning_rate(recipe, step, total)
        value = train_step(p, opt, *next(batches), lr)
        if not math.isfinite(value):
            fail(f"non-finite loss at step {step}")
        losses.append(value)
        done = step
        clock = time.perf_counter() - start
        timer.record(step, clock)
        last = timer.ends_after(step, clock, total)
        if clock >= next_log * budget or last:
            say(f"step {step}/~{total} loss {np.mean(losses[-20:]):.3f} lr {lr:.3g} "
                f"{step * B * S / clock:.0f} tok/s {clock:.1f} s")
            next_log = math.floor(clock / budget * 10 + 1) / 10
        if last:
            break
    seconds = time.perf_counter() - start
    recompiled = counters["stats"]["unique_graphs"] - graphs_before

    # 5. Our checkpoint, scored by `moe eval` (and by torch).
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "init/config.json", out / "config.json")
    shutil.copy(work / "tok/tokenizer.json", out / "tokenizer.json")
    trained = {k: np.ascontiguousarray(t.detach().numpy(), dtype=np.float32) for k, t in p.items()}
    save_file(trained, out / "model.safetensors", metadata={"step": str(done)})
    eval_seq = args.eval_seq or min(config["max_seq_len"], 256)

    def moe_eval(checkpoint):
        stdout, _ = run([moe, "eval", "--checkpoint", checkpoint, "--data", val_file, "--seq",
                         eval_seq, "--threads", args.threads, "--json"], f"moe eval of {checkpoint}")
        return json.loads(stdout)

    say("moe eval of the trained checkpoint; the same in torch…")
    scored = moe_eval(out)
    val_tokens = tok.encode(val_text)  # what moe eval encodes
    if val_tokens != val_ids:
        say(f"note: the validation text re-encodes to {len(val_tokens)} tokens, not the split's "
            f"{len(val_ids)} (BPE merges across the cut): moe eval scores the re-encoded ones")
    mine = torch_eval(torch, peers, p, config, val_tokens, lambda i: len(tok.token_bytes[i]),
                      eval_seq)
    ours = None
    if args.ours:
        ours = moe_eval(args.ours)
        summary = Path(args.ours, "summary.json")
        if summary.exists():
            s = json.loads(summary.read_text())
            ours["run"] = {k: s.get(k) for k in ("steps", "training_seconds", "tokens_per_sec",
                                                  "threads", "val_bits_per_byte")}

    report = {
        "peer": "torch.compile",
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]},
        "compile_mode": peers.TORCH_COMPILE_MODE,
        "threads": args.threads, "cpu_affinity": sorted(ALL_CORES), "cpu": cpu_model(),
        "isa_cap": os.environ.get("MOE_SIMD") or None,
        "recipe_file": str(args.recipe), "recipe": recipe, "seed": args.seed,
        "text": str(text_path), "tokens": {"total": n, "train": cut, "val": n - cut},
        "decode_round_trip_exact": round_trip,
        "val_text_reencodes_to_the_split": val_tokens == val_ids,
        "proof": proof,
        "compile_and_warmup_s": compile_s, "warmup_steps_untimed": WARMUP_STEPS,
        "graphs_compiled_while_timed": recompiled,
        "budget_s": budget, "steps": done, "schedule_steps": total, "training_s": seconds,
        "tokens_per_s": done * B * S / seconds,
        "final_lr": lr, "final_train_loss": losses[-1],
        "train_loss_last_50_mean": float(np.mean(losses[-50:])),
        "checkpoint": str(out), "val_text": str(val_file),
        "moe_eval": scored, "val_bits_per_byte": scored["bits_per_byte"],
        "torch_eval": mine,
        "ours_moe_eval": ours,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    say(f"torch.compile: {done} steps in {seconds:.1f} s ({report['tokens_per_s']:.0f} tok/s), "
        f"train loss {losses[-1]:.3f}; validation {scored['bits_per_byte']:.4f} bits/byte "
        f"(moe eval), {mine['bits_per_byte']:.4f} (torch)"
        + (f"; ours {ours['bits_per_byte']:.4f} bits/byte (moe eval)" if ours else ""))
    if recompiled:
        say(f"warning: {recompiled} graph(s) compiled while the clock ran")
    print(json.dumps({k: report[k] for k in ("steps", "training_s", "tokens_per_s",
                                              "val_bits_per_byte")}))


if __name__ == "__main__":
    main()
