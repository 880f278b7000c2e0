"""Paired A/B timing of two `moe` binaries (standard library only).

    python3 bench/ab.py MOE_A MOE_B [--scenario ID ...] [--rounds N] [--trials T]
                        [--threads N] [--threads-b N]

The machine's speed drifts between minutes, so two runs taken minutes apart
cannot be compared. This runs A and B alternately, `--rounds` times per
scenario (each a `moe bench --scenario ID --trials T --json` child), and
prints a Markdown table of the median over rounds of each binary's median,
the ratio B ÷ A of those, the median of the rounds' own ratios (each round's
B ÷ A, measured a second apart, is the pairing's point), and every round's
median so the spread is visible. With
`--threads-b`, B runs with that many intra-op threads (A with `--threads`):
the same binary twice then measures the speedup of threads in one window.
"""

import argparse
import json
import statistics
import subprocess


def median_ns(moe, scenario, trials, threads):
    out = subprocess.run(
        [moe, "bench", "--scenario", scenario, "--trials", str(trials),
         "--threads", str(threads), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    (entry,) = [s for s in json.loads(out)["scenarios"] if s["id"] == scenario]
    return entry["median_ns"]


def duration(ns):
    return f"{ns / 1e6:.2f} ms" if ns >= 1e6 else f"{ns / 1e3:.1f} µs"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the `moe` binary measured first in every round")
    parser.add_argument("b", help="the `moe` binary measured second")
    parser.add_argument("--scenario", nargs="+", default=["scale_train_256"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="`moe bench --threads` for A (and B)")
    parser.add_argument("--threads-b", type=int, help="`moe bench --threads` for B (default: --threads)")
    args = parser.parse_args()
    threads = {"a": args.threads, "b": args.threads if args.threads_b is None else args.threads_b}
    print(f"A = `{args.a}`, B = `{args.b}`; {args.rounds} alternating rounds of "
          f"`moe bench --scenario ID --trials {args.trials} --threads N` per scenario, "
          f"N = {threads['a']} for A and {threads['b']} for B.\n")
    print("| scenario | A (median of rounds) | B | B ÷ A | median of round ratios | rounds A | rounds B |")
    print("|---|---|---|---|---|---|---|")
    for scenario in args.scenario:
        runs = {"a": [], "b": []}
        for _ in range(args.rounds):
            for side in ("a", "b"):
                runs[side].append(median_ns(getattr(args, side), scenario, args.trials, threads[side]))
        a, b = (statistics.median(runs[s]) for s in ("a", "b"))
        rounds = {s: " ".join(f"{v / 1e6:.2f}" for v in runs[s]) for s in runs}
        paired = statistics.median(y / x for x, y in zip(runs["a"], runs["b"]))
        print(f"| {scenario} | {duration(a)} | {duration(b)} | {b / a:.3f} | {paired:.3f} "
              f"| {rounds['a']} | {rounds['b']} |")


if __name__ == "__main__":
    main()
