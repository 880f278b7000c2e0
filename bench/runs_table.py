"""Markdown table of `moe bench --json FILE` runs, one row per file and scenario.

    python3 bench/runs_table.py docs/perf/zen3/large-batch/*.json

Columns: when, CPU and SIMD level, threads, the suite's FMA peak probe
(one core), the scenario's median and fastest trial, and its GFLOP/s as a
percentage of the probe times the threads (what `moe bench` prints as
"% peak"). Standard library only.
"""

import json
import sys


def rows(path):
    with open(path) as f:
        report = json.load(f)
    meta = report["metadata"]
    for s in report["scenarios"]:
        yield (
            meta["timestamp"],
            f'{meta["cpu_model"]}, {meta["simd_level"]}',
            str(meta["intra_op_threads"]),
            f'{meta["fma_peak_gflops"]:.1f}',
            s["id"],
            f'{s["median_ns"] / 1e6:.1f}',
            f'{s["min_ns"] / 1e6:.1f}',
            f'{s["derived"]["pct_of_peak"]:.1f}',
        )


def main(paths):
    if not paths:
        sys.exit(__doc__)
    head = ["run (UTC)", "CPU, level", "threads", "FMA peak probe (GFLOP/s, one core)",
            "scenario", "median (ms)", "fastest (ms)", "% of peak"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path in paths:
        for row in rows(path):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
