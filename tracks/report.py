"""The cross-language report of the Rosetta tracks: every language's 22-scenario
suite (Rust's `moe bench`, every `tracks/*/run bench`) in interleaved rounds, and
the framework peers (bench/peers) when their venv exists; one JSON, one Markdown
page and SVG plots.

Round r runs each language's whole suite once, in an order rotated by r, so the
drift of a shared machine hits every language alike. Per scenario and language the
report gives the median over rounds of each round's median (and likewise for
memory and GC figures).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = [  # (label, scenario id, unit)
    ("forward (tiny, B2 S32)", "dispatch_warm", "ms"),
    ("train step (tiny, B2 S8)", "mem_train_step", "ms"),
    ("T4 inference (4 × forward)", "parallel_T4", "ms"),
    ("T4 training (4 × train step)", "parallel_train_T4", "ms"),
    ("softmax (1000)", "kernel_softmax", "µs"),
]
BATCHES, SEQS = (1, 2, 4, 8), (8, 16, 32, 64)


def languages(quick, scenario):
    """{name: command} of every suite: Rust, then each track with an executable run."""
    flags = (["--quick"] if quick else []) + ["--scenario", scenario]
    suites = {"rust": [str(ROOT / "target/release/moe"), "bench", *flags]}
    for run in sorted(ROOT.glob("tracks/*/run")):
        if os.access(run, os.X_OK):
            suites[run.parent.name] = [str(run), "bench", *flags]
    return suites


def run_suite(name, command, out):
    """Runs one language's suite, writing its JSON to `out`; returns the parsed report."""
    print(f"  {name}: {shlex.join(command)} --json {out}", file=sys.stderr, flush=True)
    done = subprocess.run([*command, "--json", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"error: the {name} suite failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(rounds):
    """One language's reports (one per round) → per-scenario medians over rounds."""
    ids = [s["id"] for s in rounds[0]["scenarios"]]
    out = {}
    for sid in ids:
        runs = [next(s for s in r["scenarios"] if s["id"] == sid) for r in rounds]
        pick = lambda f: median([f(s) for s in runs])
        runs_per_trial = lambda s: s["trial_runs"] * s.get("reps_per_trial", 1)
        out[sid] = {
            "params": runs[0]["params"],
            "median_ns": pick(lambda s: s["median_ns"]),
            "round_medians_ns": [s["median_ns"] for s in runs],
            "iqr_ns": pick(lambda s: s["iqr_ns"]),
            "throughput_tokens_per_sec": pick(lambda s: s["throughput_tokens_per_sec"]),
            "gflops": pick(lambda s: s["derived"]["gflops"]),
            "peak_rss_bytes": pick(lambda s: s["memory"]["peak_rss_bytes"]),
            "alloc_bytes": pick(lambda s: s["memory"]["alloc_bytes"]),
            "gc_pause_count": pick(lambda s: s["gc"]["gc_pause_count"]),
            "total_gc_time_ns": pick(lambda s: s["gc"]["total_gc_time_ns"]),
            "gc_pauses_per_run": pick(lambda s: s["gc"]["gc_pause_count"] / runs_per_trial(s)),
            "gc_throughput": pick(lambda s: s["derived"]["gc_throughput"]),
        }
    last = rounds[-1]
    return {"metadata": last["metadata"], "static_metrics": last["static_metrics"], "scenarios": out,
            "derived": last.get("derived", {})}


def run_peers(rounds, scenario):
    """bench/peers (NumPy forward, PyTorch eager, JAX jit beside Rust), if its venv exists."""
    if not (ROOT / "bench/peers/.venv").exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        command = [str(ROOT / "bench/peers/run"), "--rounds", str(rounds), "--json", str(out)]
        if scenario != "*":
            command += ["--scenario", scenario.replace("*", "")]
        print(f"peers: {shlex.join(command)}", file=sys.stderr, flush=True)
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
            print("peers failed; left out of the report", file=sys.stderr)
            return None
        return json.loads(out.read_text())


# ---------------------------------------------------------------- Markdown

def fmt_time(ns, unit="ms"):
    if ns is None:
        return "—"
    return f"{ns / 1e6:.3f}" if unit == "ms" else f"{ns / 1e3:.2f}"


def fmt_ms(ns):
    return "—" if ns is None else f"{ns / 1e6:.4g}"


def fmt_bytes(n):
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return lines


def headline_rows(report):
    langs = report["languages"]
    rust = langs.get("rust", {}).get("scenarios", {})
    rows = []
    for label, sid, unit in HEADLINE:
        cells = [f"{label} — `{sid}` ({unit})"]
        for lang in langs.values():
            s = lang["scenarios"].get(sid)
            if s is None:
                cells.append("—")
                continue
            text = fmt_time(s["median_ns"], unit)
            if sid in rust and lang is not langs.get("rust"):
                text += f" ({s['median_ns'] / rust[sid]['median_ns']:.1f}×)"
            cells.append(text)
        rows.append(cells)
    rss = ["peak RSS, largest over the suite"]
    for lang in langs.values():
        values = [s["peak_rss_bytes"] for s in lang["scenarios"].values() if s["peak_rss_bytes"]]
        rss.append(fmt_bytes(max(values)) if values else "—")
    rows.append(rss)
    return rows


def gc_rows(report):
    rows = []
    for name, lang in report["languages"].items():
        sc = lang["scenarios"]
        train = sc.get("mem_train_step", {})
        pauses = sum(s["gc_pause_count"] or 0 for s in sc.values())
        pause_ns = sum(s["total_gc_time_ns"] or 0 for s in sc.values())
        lowest = min((s["gc_throughput"] for s in sc.values() if s["gc_throughput"] is not None), default=None)
        rows.append([name, f"{pauses:.0f}", f"{pause_ns / 1e6:.2f}",
                     f"{train.get('gc_pauses_per_run', 0):.3f}" if train else "—",
                     fmt_bytes(train.get("alloc_bytes")), fmt_bytes(sc.get("dispatch_warm", {}).get("alloc_bytes")),
                     f"{train['gc_throughput']:.4f}" if train else "—",
                     f"{lowest:.4f}" if lowest is not None else "—"])
    return rows


def scaling_rows(report, prefix, values):
    rows = []
    for v in values:
        cells = [str(v)]
        for lang in report["languages"].values():
            s = lang["scenarios"].get(f"{prefix}{v}")
            cells.append(f"{s['throughput_tokens_per_sec']:,.0f}" if s else "—")
        rows.append(cells)
    return rows


def markdown(report, plots):
    names = list(report["languages"])
    meta = next(iter(report["languages"].values()))["metadata"]
    versions = ", ".join(f"{n}: {l['metadata']['language_version']}" for n, l in report["languages"].items())
    lines = [
        "# Rosetta tracks: the same model in several languages",
        "",
        f"Generated by `{report['command']}` on {report['date']} ({meta['cpu_model']}, "
        f"{meta['threads']} hardware threads, {meta['os']}). {versions}.",
        "",
        f"Every language ran its suite (CONTRACT §10; scenarios `{report['scenario']}`) once per round, "
        f"{report['rounds']} interleaved round{'s' if report['rounds'] > 1 else ''} in rotating order"
        f"{', quick suites (3 trials after 1 warm-up)' if report['quick'] else ''}. "
        "Each figure is the median over rounds of the round's median. "
        "Every track is checked by `reference/parity` against the JAX reference with Rust's "
        "tolerances (part of `./test.sh`). "
        "Times are wall-clock per run on a machine shared with other work: compare them as orders "
        "of magnitude, not percent.",
        "",
        "## Headline",
        "",
        "Median time per run; in brackets, how many times Rust's time.",
        "",
        *table(["", *names], headline_rows(report)),
        "",
    ]
    if plots:
        lines += [f"![headline]({plots}/headline.svg)", ""]
    lines += [
        "## Garbage collection and allocation",
        "",
        "Pauses and pause time summed over every scenario's timed runs. Rust has no collector "
        "(its figures are zero by construction); Python's are CPython's cyclic collector "
        "(`gc.callbacks`, NumPy buffers are freed by reference counting, not by it); Go's are "
        "`runtime.MemStats`. alloc is per run: Rust and Go count every byte allocated, Python "
        "reports tracemalloc's peak of one run (a lower bound). gc_throughput = 1 − GC time / run time.",
        "",
        *table(["language", "pauses", "pause time (ms)", "pauses per train step",
                "alloc / train step", "alloc / forward", "gc_throughput (train)", "gc_throughput (lowest)"],
               gc_rows(report)),
        "",
        "## Scaling",
        "",
        "Forward throughput, tokens per second (tiny model).",
        "",
        *table(["batch (S 32)", *names], scaling_rows(report, "mem_scale_batch_", BATCHES)),
        "",
        *table(["sequence (B 2)", *names], scaling_rows(report, "mem_scale_seq_", SEQS)),
        "",
    ]
    if plots:
        lines += [f"![scaling]({plots}/scaling.svg)", ""]
    lines += [
        "## How much source each language needs",
        "",
        "Rust: `src/` (model, kernels, CLI, benchmark, unit tests). Tracks: each track's own source "
        "(model, CLI, benchmark; tests excluded). SLOC excludes blank lines, comments and docstrings.",
        "",
        *table(["language", "SLOC", "gzip bytes", "functions", "files"],
               [[n, l["static_metrics"]["sloc"], l["static_metrics"]["source_gzip_bytes"],
                 l["static_metrics"]["function_count"], l["static_metrics"].get("files", "—")]
                for n, l in report["languages"].items()]),
        "",
        "## Every scenario",
        "",
        "Median ms per run (median over rounds), four significant digits.",
        "",
        *table(["scenario", *names],
               [[f"`{sid}`", *[fmt_ms(l["scenarios"].get(sid, {}).get("median_ns")) for l in
                               report["languages"].values()]]
                for sid in next(iter(report["languages"].values()))["scenarios"]]),
        "",
    ]
    if report.get("peers"):
        peers = report["peers"]
        cols = ["rosetta-moe", "NumPy", "PyTorch", "JAX jit"]
        lines += ["## Framework peers", "",
                  f"From `{peers['command']}` ({peers['rounds']} rounds, its own interleaving with Rust): "
                  "median ms per run.", "",
                  *table(["scenario", *cols],
                         [[f"`{r['scenario']}`", *[f"{r['results'][c]['median_ms']:.3f}"
                                                   if "median_ms" in r["results"].get(c, {}) else "—"
                                                   for c in cols]] for r in peers["rows"]]), ""]
    else:
        lines += ["Framework peers (PyTorch, JAX): not in this report — they join when "
                  "`bench/peers/.venv` exists and `--no-peers` is not given (see docs/peers.md).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def plots(report, directory):
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "rosetta-moe"
    directory.mkdir(parents=True, exist_ok=True)
    names = list(report["languages"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        sc = report["languages"][name]["scenarios"]
        ys = [sc[sid]["median_ns"] / 1e6 if sid in sc else 0 for _, sid, _ in HEADLINE]
        ax.bar([x + i * width for x in range(len(HEADLINE))], ys, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(HEADLINE))],
                  [sid for _, sid, _ in HEADLINE], rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("ms per run (log)")
    ax.set_title("Headline scenarios, median of round medians")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "headline.svg", metadata={"Date": None})
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, prefix, values, label in ((axes[0], "mem_scale_batch_", BATCHES, "batch (S 32)"),
                                      (axes[1], "mem_scale_seq_", SEQS, "sequence length (B 2)")):
        for name in names:
            sc = report["languages"][name]["scenarios"]
            points = [(v, sc[f"{prefix}{v}"]["throughput_tokens_per_sec"]) for v in values if f"{prefix}{v}" in sc]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        if not ax.lines:
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("tokens / s (log)")
        ax.legend()
    fig.suptitle("Forward throughput scaling")
    fig.tight_layout()
    fig.savefig(directory / "scaling.svg", metadata={"Date": None})
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the aggregated results here")
    ap.add_argument("--markdown", help="write the Markdown report here")
    ap.add_argument("--plots", help="write the SVG plots into this directory")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="quick suites (3 trials after 1 warm-up)")
    ap.add_argument("--scenario", default="*", help="only scenario ids matching this glob")
    ap.add_argument("--no-peers", action="store_true", help="leave the framework peers out")
    ap.add_argument("--from", dest="source", metavar="JSON",
                    help="do not run: render the Markdown and plots from an earlier --json")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be ≥ 1")
    report = json.loads(Path(args.source).read_text()) if args.source else measure(args)
    if args.json and not args.source:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    plot_dir = None
    if args.plots:
        plots(report, Path(args.plots))
        print(f"wrote plots to {args.plots}", file=sys.stderr)
        if args.markdown:
            plot_dir = os.path.relpath(Path(args.plots).resolve(), Path(args.markdown).resolve().parent)
    text = markdown(report, plot_dir)
    if args.markdown:
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}", file=sys.stderr)
    else:
        print(text)


def measure(args):
    """Runs every suite in interleaved rounds (and the peers); returns the report."""
    suites = languages(args.quick, args.scenario)
    results = {name: [] for name in suites}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(suites)[r % len(suites):] + list(suites)[:r % len(suites)]
            print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr, flush=True)
            for name in order:
                results[name].append(run_suite(name, suites[name], Path(tmp) / f"{name}-{r}.json"))
    return {
        "command": "tracks/report " + shlex.join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "rounds": args.rounds, "quick": args.quick, "scenario": args.scenario,
        "languages": {name: aggregate(rounds) for name, rounds in results.items()},
        "peers": None if args.no_peers else run_peers(args.rounds, args.scenario),
        "seconds": round(time.time() - started),
    }


if __name__ == "__main__":
    main()
