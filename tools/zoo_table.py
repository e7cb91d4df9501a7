"""docs/results.md's zoo table: GDWS at several budgets on a zoo model, measured end to end.

For each budget: optimize (API), validate against the original on the same first --n test
samples (clean + white-box PGD-20 on each model, scored in ONNX Runtime), and time optimized vs
original interleaved on the CPU EP (spinning off, order alternating; median ratio with its
10-90 % spread). Prints a Markdown table and writes the JSON behind it.

    python tools/zoo_table.py models/vgg_small_fgsm.onnx --n 1000 \
        --budget error:0.05 --budget error:0.1 --budget mac:1.5 --budget mac:2 --budget latency:1.2 \
        --json out/zoo_table.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx  # noqa: E402

from gdws_onnx import optimize, validate  # noqa: E402
from gdws_onnx.runtime.bench import BenchConfig, compare_models, environment  # noqa: E402
from gdws_onnx.provenance import versions  # noqa: E402
from gdws_onnx.sweep.report import md_table  # noqa: E402

KINDS = {"error": "error_budget", "mac": "mac_reduction", "latency": "latency_reduction"}


def _options(spec: str) -> dict:
    kind, _, value = spec.partition(":")
    if kind not in KINDS:
        raise SystemExit(f"--budget {spec}: expected error:EPS, mac:R or latency:R")
    return {KINDS[kind]: float(value), "target": "latency" if kind == "latency" else "macs"}


def row(model: onnx.ModelProto, spec: str, n: int, batches: list[int], runs: int) -> dict:
    out, rep = optimize(model, **_options(spec))
    v = validate(model, out, n=n, attacks=("pgd",), eps=0.1, steps=20)
    r = {"budget": spec, "rewritten": len(rep.rewritten), "conv_mac_reduction": rep.mac_reduction,
         "clean": [v.original.clean_accuracy, v.optimized.clean_accuracy],
         "pgd20": [v.original.robust_accuracy, v.optimized.robust_accuracy],
         "agreement": v.agreement, "robust_mcnemar_p": v.robust_difference_test["p_value"]}
    for b in batches:
        _, (ratio,) = compare_models([model, out], ["original", "gdws"], BenchConfig(batch=b, runs=runs))
        r[f"latency_ratio_b{b}"] = [ratio.median, ratio.p10, ratio.p90]
    return r


def markdown(rows: list[dict], batches: list[int]) -> str:
    head = ["budget", "convs rewritten", "conv MACs /", "clean acc.", "PGD-20 acc.", "agreement",
            *[f"latency ratio b={b} [p10-p90]" for b in batches]]
    cells = [[r["budget"], str(r["rewritten"]), f"{r['conv_mac_reduction']:.2f}",
              f"{100 * r['clean'][0]:.1f} -> {100 * r['clean'][1]:.1f}",
              f"{100 * r['pgd20'][0]:.1f} -> {100 * r['pgd20'][1]:.1f}", f"{100 * r['agreement']:.1f}%",
              *(f"{m:.2f} [{lo:.2f}-{hi:.2f}]" for m, lo, hi in (r[f"latency_ratio_b{b}"] for b in batches))]
             for r in rows]
    return md_table(head, cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", action="append", required=True, help="error:EPS, mac:R or latency:R")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    model = onnx.load(a.model)
    rows = []
    for spec in a.budget:
        rows.append(row(model, spec, a.n, batches, a.runs))
        print(json.dumps(rows[-1]), file=sys.stderr)
    env = {**environment(BenchConfig()), "versions": versions(), "model": a.model, "n": a.n,
           "attack": "PGD-20 L-inf eps 0.1 step eps/4, 1 random start, white-box on each model"}
    print(markdown(rows, batches))
    print(f"\n{json.dumps(env)}")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
