#!/usr/bin/env python3
"""Time to quality on Tiny Shakespeare: the evidence behind
docs/training/shakespeare.md, produced and rendered by one script.

    bench/shakespeare.py run [--only main|15min|peers] [--from-15min DIR]
    bench/shakespeare.py render

`run` trains both recipes on both cores and keeps, per recipe, in
docs/training/shakespeare/<recipe>/: the run's summary.json and metrics.jsonl,
`moe eval --split val` of its checkpoint (eval-val.json: the whole held-out
10 %, every token scored once), a sample (sample.json) and, from
bench/peers/time_to_quality.py, the torch.compile peer trained with the same
recipe for the same wall-clock time and scored by the same `moe eval`
(peer.json). A step whose output exists is skipped, so a stopped run
continues. `--from-15min DIR` takes an existing `--recipe shakespeare-15min`
run directory instead of training one. `render` writes the page and its
plot from those files only. Standard library only.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from sweep import cpu_model, simd

ROOT = Path(__file__).resolve().parent.parent
MOE = ROOT / "target" / "release" / "moe"
OUT = ROOT / "docs" / "training" / "shakespeare"
PAGE = ROOT / "docs" / "training" / "shakespeare.md"
PLOT = ROOT / "docs" / "img" / "shakespeare-quality.svg"
WORK = Path("/tmp/rosetta-shakespeare")
PEER = ROOT / "bench" / "peers" / "time_to_quality.py"
PEER_PYTHON = ROOT / "bench" / "peers" / ".venv" / "bin" / "python"
PROMPT = "ROMEO:"
RECIPES = {
    "90s": {"recipe": "shakespeare-90s", "train": [], "target": 2.65,
            "command": "cargo run --release -- train"},
    "15min": {"recipe": "shakespeare-15min", "train": ["--recipe", "shakespeare-15min"],
              "target": 2.12, "command": "moe train --recipe shakespeare-15min"},
}
SAMPLE = ["--prompt", PROMPT, "--max-new", "60", "--strategy", "top-p", "--top-p", "0.9",
          "--temperature", "0.8", "--seed", "7"]


def moe(*args, json_out=None):
    cmd = [str(MOE), *args]
    print("$ moe " + " ".join(args), flush=True)
    if json_out is None:
        subprocess.run(cmd, check=True)
        return None
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    json_out.write_text(out)
    return json.loads(out)


def train_and_score(name, from_dir=None):
    spec, out = RECIPES[name], OUT / name
    out.mkdir(parents=True, exist_ok=True)
    run = Path(from_dir) if from_dir else WORK / name
    if not (out / "machine.json").exists():
        # Each recipe records the machine it ran on (sessions change hosts).
        (out / "machine.json").write_text(json.dumps(machine(), indent=2) + "\n")
    if not (out / "summary.json").exists():
        if not from_dir:
            moe("train", *spec["train"], "--out", str(run), "--force")
        for file in ("summary.json", "metrics.jsonl"):
            shutil.copy(run / file, out / file)
    if not (out / "eval-val.json").exists():
        # Windows as long as the training windows: the model never saw longer ones.
        seq = json.loads((run / "state.json").read_text())["data"]["seq_len"]
        moe("eval", "--checkpoint", str(run), "--corpus", "shakespeare", "--split", "val",
            "--seq", str(seq), "--json", json_out=out / "eval-val.json")
    if not (out / "sample.json").exists():
        moe("generate", "--checkpoint", str(run), *SAMPLE, "--json", json_out=out / "sample.json")
    return run


def peer(name, run):
    out = OUT / name / "peer.json"
    if out.exists() or not (OUT / name / "summary.json").exists():
        return
    summary = json.loads((OUT / name / "summary.json").read_text())
    recipe = ROOT / "configs" / f"{RECIPES[name]['recipe']}.json"
    cmd = [str(PEER_PYTHON), str(PEER), "--recipe", str(recipe),
           "--time", f"{summary['training_seconds']:.1f}", "--out", str(WORK / f"peer-{name}"),
           "--ours", str(run), "--force", "--json", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def machine():
    """This machine: its CPU and `moe --version` (the SIMD level)."""
    version = subprocess.run([str(MOE), "--version"], capture_output=True, text=True).stdout
    return {"cpu": cpu_model(), "moe_version": version.strip()}


def machine_of(name):
    """The machine recipe `name` ran on (machine.json beside its files; the
    page-wide one for runs from before recipes kept their own)."""
    return load(name, "machine.json") or json.loads((OUT / "machine.json").read_text())


def run(args):
    if not MOE.exists():
        sys.exit(f"build first: cargo build --release ({MOE} is missing)")
    WORK.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    runs = {}
    if args.only in (None, "main", "peers"):
        runs["90s"] = train_and_score("90s") if args.only != "peers" else WORK / "90s"
    if args.only in (None, "15min", "peers"):
        runs["15min"] = (train_and_score("15min", args.from_15min) if args.only != "peers"
                         else Path(args.from_15min or WORK / "15min"))
    if args.only in (None, "peers"):
        for name, path in runs.items():
            peer(name, path)


def load(name, file):
    path = OUT / name / file
    return json.loads(path.read_text()) if path.exists() else None


def render(_args):
    rows, curves = [], []
    for name, spec in RECIPES.items():
        summary, scored = load(name, "summary.json"), load(name, "eval-val.json")
        sample, peer_run = load(name, "sample.json"), load(name, "peer.json")
        if summary is None:
            continue
        curves.append(f"{spec['recipe']}={OUT / name / 'summary.json'}")
        full = scored["bits_per_byte"] if scored else None
        met = "yes" if full is not None and full <= spec["target"] else "no"
        peer_cell = "—"
        if peer_run:
            peer_cell = (f"{peer_run['val_bits_per_byte']:.4f} ({peer_run['steps']} steps, "
                         f"{peer_run['training_s']:.0f} s)")
        rows.append((spec, summary, full, met, peer_cell, sample, machine_of(name)))
    lines = [
        "# Time to quality on Tiny Shakespeare", "",
        "Generated by `bench/shakespeare.py render` from the files in",
        "[`docs/training/shakespeare/`](shakespeare/), which `bench/shakespeare.py run`",
        "wrote (each command below is what it ran). Validation is the held-out 10 % of",
        "the tokens, scored whole by `moe eval --corpus shakespeare --split val`",
        "(every token once, in windows as long as the training windows); the trainer's own",
        "figure comes from its last evaluation of 8 (90 s) or 16 (15 min) batches",
        "of evenly spaced windows.",
        "",
    ]
    missing = [n for n in RECIPES if load(n, "summary.json") and not load(n, "peer.json")]
    if missing:
        lines += [f"The torch.compile peer has not run for: {', '.join(missing)}.", ""]
    if load("15min", "peer.json"):
        lines += ["The peer trains with the recipe's residual dropout as torch's `F.dropout` on the",
                  "same two outputs (the same rate, its own masks) and its own window sampler",
                  "(bench/peers/time_to_quality.py lists every difference); its figure is",
                  "`moe eval` of its weights, the same command that scores ours.", ""]
    lines += ["Each recipe ran on two cores of the machine in its row (sessions run on",
              "different hosts; `moe --version` names the SIMD level).", ""]
    lines += ["| recipe | command | steps | training s | trainer's val bits/byte | **`moe eval` val bits/byte** | target | met | torch.compile, same recipe and time | machine |",
              "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for spec, s, full, met, peer_cell, _, host in rows:
        lines.append(f"| {spec['recipe']} | `{spec['command']}` | {s['steps']} | "
                     f"{s['training_seconds']:.1f} | {s['val_bits_per_byte']:.4f} | "
                     f"**{full:.4f}** | ≤ {spec['target']} | {met} | {peer_cell} | "
                     f"{host['cpu']}, `{simd(host['moe_version'])}` |")
    lines += ["", "![validation bits/byte against seconds](../img/shakespeare-quality.svg)", "",
              "The plot: `cargo run --release --example quality_plot -- docs/img/shakespeare-quality.svg "
              + " ".join(f"{c.split('=')[0]}=docs/training/shakespeare/{n}/summary.json" for c, n in zip(curves, RECIPES))
              + " --target '90 s target=2.65' --target '15 min target=2.12'`", ""]
    lines += limits()
    for spec, s, _, _, _, sample, _ in rows:
        if sample:
            lines += [f"## A sample of {spec['recipe']}", "",
                      f"`moe generate --checkpoint RUN {' '.join(SAMPLE)}`", "", "```text",
                      PROMPT + sample["completion"], "```", ""]
    PAGE.write_text("\n".join(lines))
    print(f"wrote {PAGE.relative_to(ROOT)}")
    readme_block(rows)
    subprocess.run(["cargo", "run", "--release", "--quiet", "--example", "quality_plot", "--",
                    str(PLOT), *curves, "--target", "90 s target=2.65",
                    "--target", "15 min target=2.12"], check=True, cwd=ROOT)


def sweep(grid):
    """Each run's final bits/byte in a committed sweep (docs/training/sweeps/GRID.jsonl)."""
    lines = (ROOT / "docs" / "training" / "sweeps" / f"{grid}.jsonl").read_text().splitlines()
    return {r["name"]: r["summary"]["val_bits_per_byte"] for r in map(json.loads, filter(None, lines))}


def limits():
    """What holds the 15-minute run back, read off its own evaluations."""
    summary = load("15min", "summary.json")
    if summary is None:
        return []
    evals = summary["evaluations"]
    best = min(evals, key=lambda e: e["val_bits_per_byte"])
    first, last = evals[0], evals[-1]
    peer_run = load("15min", "peer.json")  # the recipe as run, and the split's token count
    split = "a few hundred thousand tokens, seen dozens of times in fifteen minutes"
    if peer_run:
        recipe, train = peer_run["recipe"], peer_run["tokens"]["train"]
        passes = summary["steps"] * recipe["batch"] * recipe["seq"] / train
        split = (f"{train:,} tokens at vocabulary {recipe['model']['vocab_size']}, seen "
                 f"{passes:.0f} times in fifteen minutes")
    decay_only = min(sweep("s15m").values())
    shape, three = sweep("s15m-shape"), sweep("s15m-vocab")["v2048-p0.35"]
    if best is last or last["val_bits_per_byte"] - best["val_bits_per_byte"] < 0.005:
        course = (f"Its validation figure is lowest near the end ({best['val_bits_per_byte']:.4f} "
                  f"bits/byte by the trainer's evaluation at {best['seconds']:.0f} s, "
                  f"{last['val_bits_per_byte']:.4f} at the end)")
    else:
        course = (f"Its validation figure is lowest at {best['seconds']:.0f} s (step {best['step']}: "
                  f"{best['val_bits_per_byte']:.4f} bits/byte by the trainer's evaluation) and climbs "
                  f"after it, to {last['val_bits_per_byte']:.4f} at the end")
    return [
        "## What limits the fifteen-minute run", "",
        f"Over-fitting, not speed. {course}, while the loss on training windows keeps falling "
        f"({first['train_loss']:.3f} → {last['train_loss']:.3f} nats/token; validation "
        f"{best['val_loss']:.3f} at best, {last['val_loss']:.3f} at the end). The training split is "
        f"{split}. AdamW's weight decay alone did not hold the model back (sweep s15m in "
        f"[sweeps.md](sweeps.md): {decay_only:.2f} bits/byte at the end at best); residual dropout "
        "(`--dropout`, a contract extension, sweep s15m-dropout) delays and flattens the climb but "
        "does not stop it, and a smaller vocabulary (sweep s15m-vocab) lowers the plateau. Every "
        "further pass over the training tokens then costs validation, so the fifteen minutes are "
        "best spent on a model that costs more per token and generalises better from each: at "
        f"equal width, 3 layers ended at {three:.4f}, 4 at {shape['l4']:.4f} and "
        f"5 at {shape['l5']:.4f} bits/byte (sweep s15m-shape; a wider 3-layer model, "
        f"{shape['h160']:.4f}, did not help).", ""]


def readme_block(rows):
    """The README's figures, between its shakespeare markers, from the same files."""
    begin, end = "<!-- shakespeare:begin -->", "<!-- shakespeare:end -->"
    readme = (ROOT / "README.md").read_text()
    if begin not in readme:
        return
    lines = [begin, "", "| recipe | command | steps | training s | validation bits/byte (`moe eval`, whole split) | target | two cores of |",
             "|---|---|---:|---:|---:|---:|---|"]
    for spec, s, full, _, _, _, host in rows:
        lines.append(f"| {spec['recipe']} | `{spec['command']}` | {s['steps']} | {s['training_seconds']:.1f} "
                     f"| {full:.4f} | ≤ {spec['target']} | {host['cpu']}, `{simd(host['moe_version'])}` |")
    lines += ["", "Rendered by `bench/shakespeare.py render` "
              "from [docs/training/shakespeare/](docs/training/shakespeare/).", ""]
    sample = next((r[5] for r in rows if r[5]), None)
    if sample:
        lines += [f"A sample of {rows[0][0]['recipe']} (`moe generate --checkpoint run {' '.join(SAMPLE)}`):",
                  "", "```text", PROMPT + sample["completion"], "```", ""]
    lines.append(end)
    head, rest = readme.split(begin, 1)
    (ROOT / "README.md").write_text(head + "\n".join(lines) + rest.split(end, 1)[1])
    print("wrote README.md's Shakespeare figures")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train, score and sample both recipes, then their peers")
    r.add_argument("--only", choices=["main", "15min", "peers"])
    r.add_argument("--from-15min", metavar="DIR", help="an existing shakespeare-15min run")
    sub.add_parser("render", help="write docs/training/shakespeare.md and its plot")
    a = p.parse_args()
    run(a) if a.cmd == "run" else render(a)


if __name__ == "__main__":
    main()
