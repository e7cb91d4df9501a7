"""docs/results.md's FC table: a model's Gemm/MatMul layers rewritten as Kronecker sums and as plain low
rank (convs untouched) at a few budgets, measured end to end.

It runs `onnx-gdws sweep` with only the FC peers (`--budget none --peer fc-kronecker --peer
fc-lowrank --fc-budget ...`), so every point is measured exactly as the sweep measures its points:
clean and white-box PGD-20 accuracy (L-inf eps 0.1, step eps/4, one random start, each model
attacked with its own gradients, ONNX Runtime judging) on the first --n test images, agreement
with the original, and the latency ratio to the original at each batch, timed interleaved (order
alternating, spinning off; median [p10-p90]). Resumable: a rerun with the same --out skips the
points already measured. Prints two Markdown tables (one row per point; one row per rewritten
layer, with its predicted weight error) and the environment.

    python tools/fc_table.py models/vgg_small_fgsm.onnx --n 1000 --threads 1 --out out/fc_table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx  # noqa: E402

from gdws_onnx.graph.fc import find_fc_sites  # noqa: E402
from gdws_onnx.sweep.report import METHOD_NAMES, baseline, batches, md_table  # noqa: E402
from gdws_onnx.sweep.plan import DEFAULT_FC_BUDGETS, SweepOptions  # noqa: E402
from gdws_onnx.sweep.results import PointResult, SweepResult  # noqa: E402
from gdws_onnx.sweep.run import sweep  # noqa: E402

SCHEMES = ("fc-kronecker", "fc-lowrank")


def fc_weights(model: onnx.ModelProto) -> int:
    """Weight elements of the model's Gemm/MatMul layers with a constant weight (biases apart)."""
    return sum(int(s.weight.size) for s in find_fc_sites(model) if s.weight is not None)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _latency(p: PointResult, b: str) -> str:
    m, lo, hi = p.latency[b][:3]
    return f"{m:.2f} [{lo:.2f}-{hi:.2f}]"


def point_rows(result: SweepResult, original_fc_weights: int) -> list[list[str]]:
    """One row per point: FC weights and model parameters before -> after, FC MACs /, accuracies,
    latency ratios (failed points say why)."""
    base = baseline(result)
    rows = [["original", "-", "-", f"{original_fc_weights}", f"{base.parameters}", "1.00", _pct(base.clean),
             _pct(base.robust), "100.0", *["1.00" for _ in batches(result)]]]
    for p in result.points:
        if p.method not in SCHEMES:
            continue
        budget = p.label.split(" ", 1)[1]
        if p.status != "ok":
            rows.append([METHOD_NAMES[p.method], budget, "failed: " + p.error[:100],
                         *[""] * (7 + len(batches(result)))])
            continue
        rw = p.fc_rewrite or {"rewritten": 0, "params_before": 0, "params_after": 0}
        after = original_fc_weights - rw["params_before"] + rw["params_after"]
        rows.append([METHOD_NAMES[p.method], budget, str(rw["rewritten"]), f"{after}", f"{p.parameters}",
                     "-" if p.fc_mac_reduction is None else f"{p.fc_mac_reduction:.2f}", _pct(p.clean),
                     _pct(p.robust), _pct(p.agreement), *[_latency(p, b) for b in batches(result)]])
    return rows


def layer_rows(result: SweepResult) -> list[list[str]]:
    """One row per rewritten layer of each point: structure, predicted error, MACs, and the scheme
    that wins on error per MAC at that budget (core.kronecker.compare_schemes)."""
    rows = []
    for p in result.points:
        if p.method not in SCHEMES or p.status != "ok" or not p.fc_rewrite:
            continue
        for layer in p.fc_rewrite["layers"]:
            rows.append([p.label, layer["name"], f"{layer['in_features']}->{layer['out_features']}",
                         layer["structure"], f"{layer['error']:.3f}", f"{layer['dense_macs']} -> {layer['macs']}",
                         layer["winner"] or "-"])
        for s in p.fc_rewrite["skipped"]:
            rows.append([p.label, s["layer"], "-", "left dense: " + s["reason"], "-", "-", "-"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", action="append", default=None,
                    help=f"FC budget error:EPS or mac:R (repeatable; default {' '.join(DEFAULT_FC_BUDGETS)})")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None,
                    help="ORT intra-op threads and torch threads (default: each library's own)")
    ap.add_argument("--out", default="out/fc_table", help="the sweep's folder (resumable)")
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    opts = SweepOptions(n=a.n, attacks=("pgd",), eps=0.1, steps=20, budgets=(), peers=SCHEMES,
                        fc_budgets=tuple(a.budget or DEFAULT_FC_BUDGETS),
                        batches=tuple(int(b) for b in a.batch.split(",")), runs=a.runs, threads=a.threads)
    command = "python tools/fc_table.py " + " ".join(sys.argv[1:])
    result = sweep(a.model, a.out, opts, command=command, log=lambda s: print(f"[fc_table] {s}", file=sys.stderr))
    bs = batches(result)
    print(md_table(["scheme", "budget", "FC layers rewritten", "FC weights", "model params", "FC MACs /",
                    "clean %", "PGD-20 %", "agreement %", *[f"latency ratio {b} [p10-p90]" for b in bs]],
                   point_rows(result, fc_weights(onnx.load(a.model)))))
    print()
    print(md_table(["point", "layer", "in->out", "structure", "rel. weight error", "MACs per row",
                    "wins on error per MAC"],
                   layer_rows(result)))
    e = result.environment
    print(f"\nCPU: {e.get('cpu')} ({e.get('cpus')} logical CPUs); EP: {e.get('ep')}; ORT intra-op threads: "
          f"{e.get('threads')}; torch threads: {a.threads or 'default'}; spinning {e.get('spinning')}")
    print("Versions: " + json.dumps(e.get("versions", {})))
    print(f"Model: {a.model}; data: {result.options['data']}, first {result.options['n']} images; "
          f"PGD-{result.options['steps']} eps {result.options['eps']:g} (step eps/4, 1 random start), white-box "
          f"on each model; {a.runs} interleaved timing rounds per batch")
    print(f"Wall time: {time.perf_counter() - start:.0f} s this run; points' own times "
          f"{sum(p.seconds for p in result.points):.0f} s (see {a.out}/sweep.json)")


if __name__ == "__main__":
    main()
