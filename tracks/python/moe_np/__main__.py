"""Command line of the NumPy track: dump, bench, generate, test (see --help)."""

import argparse
import sys
import unittest
from pathlib import Path

from .errors import MoeError


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not ≥ 1")
    return value


def parser():
    ap = argparse.ArgumentParser(prog="tracks/python/run", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="write what `moe dump` writes (for reference/parity)")
    source = d.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    source.add_argument("--resume", metavar="DIR",
                        help="a `moe train` checkpoint instead: the AdamW step continues its moments and step "
                             "count (t = its step + 1) and the moments before/after are written too")
    d.add_argument("--batch", required=True, help='batch JSON {"ids": [[...]], "targets": [[...]]}')
    d.add_argument("--out", required=True, help="output safetensors file")
    d.add_argument("--step", type=positive, default=1, help="step number t of the one AdamW step (fresh moments); ignored with --resume")
    d.add_argument("--train", help="training settings JSON (CONTRACT §6 keys); default: the defaults, or the saved ones with --resume")
    b = sub.add_parser("bench", help="the 22 scenarios of CONTRACT §10, JSON as `moe bench`")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--quick", action="store_true", help="3 trials after 1 warm-up")
    b.add_argument("--scenario", default="*", help="only ids matching this glob")
    b.add_argument("--trials", type=positive, default=10, help="timed trials per scenario")
    b.add_argument("--warmup", type=int, default=3, help="warm-up runs per scenario")
    b.add_argument("--seed", type=int, default=42, help="seed of models and inputs")
    b.add_argument("--child", help=argparse.SUPPRESS)
    g = sub.add_parser("generate", help="generate from a checkpoint with a KV cache")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", required=True, help="comma-separated token ids")
    g.add_argument("--max-len", type=positive, required=True, help="total length, prompt included (may exceed max_seq_len: the context window slides)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=42)
    sub.add_parser("test", help="run the track's unit tests")
    return ap


def run_generate(args):
    from .model import Model
    from .params import load_checkpoint
    from .sampling import Greedy, Temperature, TopK, TopP, generate

    try:
        prompt = [int(t) for t in args.prompt.split(",")]
    except ValueError as e:
        raise MoeError(f"--prompt: {e}") from e
    t = args.temperature
    strategy = (TopK(args.top_k, t) if args.top_k is not None else TopP(args.top_p, t)
                if args.top_p is not None else Temperature(t) if t > 0 else Greedy())
    model = Model(*load_checkpoint(args.checkpoint))
    print(",".join(map(str, generate(model, prompt, args.max_len, strategy, args.seed))))


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.command == "dump":
            from .dump import dump

            print(dump(args.batch, args.out, args.checkpoint, args.resume, args.step, args.train))
        elif args.command == "bench":
            from .bench import main as bench

            bench(args)
        elif args.command == "generate":
            run_generate(args)
        else:
            tests = unittest.defaultTestLoader.discover(str(Path(__file__).resolve().parents[1] / "tests"))
            return 0 if unittest.TextTestRunner(verbosity=1).run(tests).wasSuccessful() else 1
    except MoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
