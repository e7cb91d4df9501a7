"""Deprecated: the product does this now. A thin wrapper kept so that old command lines still run:

    python tools/robust_eval.py MODEL [--attack A] [--n N] ... -o R.json
        = onnx-gdws evaluate MODEL --n N --threads 1 ... -o R.json   (shards in R.json.shards, --resume)
    python tools/robust_eval.py --compare A.json B.json
        = onnx-gdws validate A.json B.json
    python tools/robust_eval.py --table NAME=R.json ...
        = onnx-gdws validate R1.json R2.json ... --markdown        (rows named NAME here)

Chunks (`--start`, comma-separated chunk lists) are gone: `evaluate --shard-size S --resume` keeps
finished shards, and `--ray` runs them in parallel. Results of the old tool (chunk JSONs) are not
read: evaluate again.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gdws_onnx.cli import main as cli  # noqa: E402


def evaluate_args(args: argparse.Namespace) -> list[str]:
    """The `onnx-gdws evaluate` command line of the old tool's MODEL ... -o OUT."""
    out = ["evaluate", args.model, "-o", args.output, "--data", args.data, "--n", str(args.n),
           "--eps", str(args.eps), "--steps", str(args.steps), "--restarts", str(args.restarts),
           "--seed", str(args.seed), "--threads", str(args.threads), "--resume"]
    for a in args.attack or ["pgd"]:
        out += ["--attack", a]
    return out


def table(entries: list[str]) -> str:
    """The markdown table of 'NAME=RESULT.json' entries, the first the reference."""
    from gdws_onnx.errors import GDWSError
    from gdws_onnx.eval.results import load_result, markdown_table

    named = [entry.partition("=") for entry in entries]
    if any(not name or not sep or not path or "," in path for name, sep, path in named):
        raise GDWSError("--table entries are NAME=RESULT.json (one `evaluate` result each)")
    return markdown_table([(name, load_result(path)) for name, _, path in named])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("-o", "--output")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    ap.add_argument("--table", nargs="+", metavar="NAME=RESULT")
    ap.add_argument("--data", default="fashion-mnist:test")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--attack", action="append", default=None)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.table:
        from gdws_onnx.errors import GDWSError

        try:
            print(table(args.table))
        except GDWSError as e:
            ap.exit(2, f"error: {e}\n")
        return
    if args.compare:
        if any("," in p for p in args.compare):
            ap.exit(2, "error: chunk lists are gone: `onnx-gdws evaluate --shard-size S --resume` keeps shards\n")
        cli(["validate", *args.compare])
        return
    if args.start:
        ap.exit(2, "error: --start is gone: `onnx-gdws evaluate --n N --shard-size S --resume` (or --ray) "
                   "evaluates in shards\n")
    if not args.model or not args.output:
        ap.error("give MODEL and -o OUTPUT (or --compare A B, or --table NAME=RESULT ...)")
    cli(evaluate_args(args))


if __name__ == "__main__":
    main()
