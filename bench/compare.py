"""Before → after table of two `moe bench` JSON files (standard library only).

    python3 bench/compare.py BEFORE.json AFTER.json [--scenario ID ...]

Prints a Markdown table: each scenario's median in both runs, the ratio
before ÷ after, and the after run's % of the roofline floor when it has one.
"""

import argparse
import json


def duration(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--scenario", nargs="*", help="only these scenario ids, in this order")
    args = parser.parse_args()
    runs = []
    for path in (args.before, args.after):
        with open(path) as f:
            runs.append({s["id"]: s for s in json.load(f)["scenarios"]})
    before, after = runs
    ids = args.scenario or [i for i in after if i in before]
    print("| scenario | before | after | before ÷ after | after: % of floor |")
    print("|---|---|---|---|---|")
    for i in ids:
        if i not in before or i not in after:
            raise SystemExit(f"scenario {i} is not in both files")
        b, a = before[i]["median_ns"], after[i]["median_ns"]
        pct = after[i]["derived"].get("pct_of_floor")
        floor = "-" if pct is None else f"{pct:.0f} %"
        print(f"| {i} | {duration(b)} | {duration(a)} | {b / a:.2f}× | {floor} |")


if __name__ == "__main__":
    main()
