"""One model's clean and white-box robust accuracy, written to JSON: the same evaluation as
`validate` and `sweep` (eval.validation.evaluate_model: attacked with its own gradients, checked
against ONNX Runtime first, every adversarial example scored in ORT), for attacks too slow to run
on two models in one command (AutoAttack, PGD-100 with restarts). Run it once per model, in
parallel if there are cores, then compare the JSONs (`--compare A.json B.json`: McNemar on the
per-sample robust correctness, same samples required).

Slow attacks can run in chunks (`--start S --n N` evaluates test images S .. S+N-1); give each side
of `--compare` as a comma-separated list of chunk JSONs, which are merged (contiguous, same
settings) before the comparison.

    python tools/robust_eval.py models/vgg16_fmnist_fgsm.onnx --attack autoattack --n 100 -o aa_orig.json
    python tools/robust_eval.py fast.onnx --attack autoattack --n 100 -o aa_fast.json
    python tools/robust_eval.py fast.onnx --attack autoattack --start 100 --n 100 -o aa_fast_100.json
    python tools/robust_eval.py --compare aa_orig.json aa_fast.json
    python tools/robust_eval.py --compare aa_orig.json,aa_orig_100.json aa_fast.json,aa_fast_100.json

`--table NAME=CHUNKS ...` prints the markdown table of several models on the same samples, the
first being the reference the others are compared with (the README's AutoAttack table):

    python tools/robust_eval.py --table original=aa_orig.json,aa_orig_100.json fast=aa_fast.json,aa_fast_100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from gdws_onnx.core.stats import mcnemar_exact, proportion, wilson_interval  # noqa: E402
from gdws_onnx.data import load_dataset  # noqa: E402
from gdws_onnx.eval.validation import ValidateOptions, check_attack_requirements, evaluate_model  # noqa: E402
from gdws_onnx.files import write_json_atomic  # noqa: E402
from gdws_onnx.provenance import json_default, versions  # noqa: E402


def evaluate(path: str, args: argparse.Namespace) -> dict:
    """The model's ModelResult as a dict, with the settings and wall time."""
    opts = ValidateOptions(data=args.data, n=args.n, attacks=tuple(args.attack), eps=args.eps, steps=args.steps,
                           restarts=args.restarts, seed=args.seed, threads=args.threads)
    check_attack_requirements(opts.attacks)
    ds = load_dataset(args.data, n=args.start + args.n)
    if len(ds.x) < args.start + args.n:
        raise SystemExit(f"{args.data} has {len(ds.x)} samples: --start {args.start} --n {args.n} does not fit")
    x = np.ascontiguousarray(ds.x[args.start:], np.float32)
    y = np.asarray(ds.y[args.start:], np.int64)
    t0 = time.perf_counter()
    res, _ = evaluate_model(onnx.load(path), path, x, y, opts, [], os.path.basename(path), None)
    return {"model": path, "settings": asdict(opts), "start": args.start, "seconds": time.perf_counter() - t0,
            "versions": versions(), "result": asdict(res)}


def measured(settings: dict) -> dict:
    """The settings a result depends on: all but the sample count and the thread count."""
    return {k: v for k, v in settings.items() if k not in ("n", "threads")}


def merge(paths: list[str]) -> dict:
    """Chunk results of one model (same settings but n, contiguous sample ranges) as one result:
    per-sample arrays concatenated in sample order, accuracies and intervals recomputed."""
    runs = sorted((json.load(open(p)) for p in paths), key=lambda r: r.get("start", 0))
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    end = first.get("start", 0)
    for r in runs:
        if r["model"] != first["model"]:
            raise SystemExit(f"chunks of different models: {first['model']} and {r['model']}")
        if measured(r["settings"]) != measured(first["settings"]):
            raise SystemExit(f"chunks of {r['model']} used different settings: not mergeable")
        if r.get("start", 0) != end:
            raise SystemExit(f"chunks of {r['model']} are not contiguous: samples {end}.. missing")
        end += r["settings"]["n"]
    robust = np.concatenate([np.asarray(r["result"]["robust_correct"], bool) for r in runs])
    clean_k = sum(round(r["result"]["clean_accuracy"] * r["settings"]["n"]) for r in runs)
    rp = proportion(robust)
    result = {**first["result"], "clean_accuracy": clean_k / len(robust),
              "clean_accuracy_interval": list(wilson_interval(clean_k, len(robust))),
              "robust_accuracy": rp.value, "robust_accuracy_interval": [rp.low, rp.high],
              "predictions": sum((r["result"]["predictions"] for r in runs), []),
              "robust_correct": robust.tolist()}
    return {**first, "settings": {**first["settings"], "n": len(robust)},
            "seconds": sum(r["seconds"] for r in runs), "result": result}


def paired(a: dict, b: dict) -> float:
    """McNemar's exact p on the per-sample robust correctness of two merged results, which must
    cover the same samples under the same settings (SystemExit otherwise)."""
    if (measured(a["settings"]), a["settings"]["n"], a.get("start", 0)) != \
            (measured(b["settings"]), b["settings"]["n"], b.get("start", 0)):
        raise SystemExit("the two runs used different settings (samples, attacks, eps ...): not comparable")
    return mcnemar_exact(np.asarray(a["result"]["robust_correct"]),
                         np.asarray(b["result"]["robust_correct"])).p_value


def compare(a_paths: str, b_paths: str) -> str:
    """Both results side by side and McNemar's exact test on the per-sample robust correctness.
    Each side is one JSON or a comma-separated list of chunk JSONs (see `merge`)."""
    a, b = merge(a_paths.split(",")), merge(b_paths.split(","))
    p = paired(a, b)
    ra, rb = a["result"], b["result"]
    lines = []
    for name, r in ((a["model"], ra), (b["model"], rb)):
        ci = r["robust_accuracy_interval"]
        lines.append(f"{name}: clean {100 * r['clean_accuracy']:.1f} %, robust {100 * r['robust_accuracy']:.1f} % "
                     f"[{100 * ci[0]:.1f}-{100 * ci[1]:.1f}] ({', '.join(a['settings']['attacks'])}, "
                     f"n = {len(r['predictions'])})")
    lines.append(f"robust drop {100 * (ra['robust_accuracy'] - rb['robust_accuracy']):+.1f} pp, McNemar p = {p:.3g}")
    return "\n".join(lines)


def paired_change(a: dict, b: dict) -> tuple[int, int, float, float, float]:
    """(lost, gained, change, low, high): samples robust under `a` but not `b` and the reverse,
    b's robust accuracy minus a's, and its approximate 95 % interval (normal, paired)."""
    x, y = (np.asarray(r["result"]["robust_correct"], bool) for r in (a, b))
    n, lost, gained = len(x), int((x & ~y).sum()), int((~x & y).sum())
    change = (gained - lost) / n
    se = np.sqrt(max(lost + gained - (gained - lost) ** 2 / n, 0.0)) / n
    return lost, gained, change, change - 1.96 * se, change + 1.96 * se


def table(entries: list[str]) -> str:
    """A markdown table of 'NAME=CHUNKS' entries (CHUNKS as for `compare`), the first the reference:
    clean %, robust % [95 % CI], its change from the reference in points (approximate paired 95 %
    interval), the samples it lost and gained against the reference, and McNemar's p."""
    named = [entry.partition("=") for entry in entries]
    if any(not name or not sep or not paths for name, sep, paths in named):
        raise SystemExit("--table entries are NAME=JSON[,JSON...]")
    runs = [(name, merge(paths.split(","))) for name, _, paths in named]
    ref = runs[0][1]
    attacks = ", ".join(ref["settings"]["attacks"])
    lines = [f"| model | clean % | {attacks} % [95 % CI] | change (pp) [95 % CI] | lost / gained | McNemar p |",
             "|---|---|---|---|---|---|"]
    for name, run in runs:
        r = run["result"]
        lo, hi = r["robust_accuracy_interval"]
        change, swaps, p = "-", "-", "-"
        if run is not ref:
            p = f"{paired(ref, run):.3g}"
            lost, gained, d, d_lo, d_hi = paired_change(ref, run)
            change, swaps = f"{100 * d:+.1f} [{100 * d_lo:+.1f} to {100 * d_hi:+.1f}]", f"{lost} / {gained}"
        lines.append(f"| {name} | {100 * r['clean_accuracy']:.1f} | {100 * r['robust_accuracy']:.1f} "
                     f"[{100 * lo:.1f}-{100 * hi:.1f}] | {change} | {swaps} | {p} |")
    first = ref.get("start", 0)
    lines.append(f"\n(test images {first}-{first + ref['settings']['n'] - 1}, eps {ref['settings']['eps']:g})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("-o", "--output", help="result JSON")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two result JSONs")
    ap.add_argument("--table", nargs="+", metavar="NAME=CHUNKS", help="markdown table, the first the reference")
    ap.add_argument("--data", default="fashion-mnist:test")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0, help="first test sample (for chunked runs)")
    ap.add_argument("--attack", action="append", default=None, help="pgd, pgd-l2, square, autoattack (repeatable)")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return
    if args.table:
        print(table(args.table))
        return
    if not args.model or not args.output:
        ap.error("give MODEL and -o OUTPUT (or --compare A B)")
    args.attack = args.attack or ["pgd"]
    out = evaluate(args.model, args)
    write_json_atomic(args.output, out, indent=1, default=json_default)
    r = out["result"]
    print(f"{args.model}: clean {100 * r['clean_accuracy']:.1f} %, robust {100 * r['robust_accuracy']:.1f} % "
          f"({', '.join(args.attack)}, samples {args.start}-{args.start + args.n - 1}) in {out['seconds']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
