"""Latency of GDWS rewrites whose widths are rounded to multiples (`optimize --width-multiple N`).

For each error budget, the model is optimized with width multiples 1 (off), 8 and 16, and the
original and the variants are timed interleaved in one run (ONNX Runtime CPU EP, spinning off);
each ratio is the median of per-round ratios [p10-p90] against the original. With --fold, each
variant is also timed with its Gathers folded into the producing convs (fold.FoldGatherPass).

    python tools/width_multiple.py models/vgg_small_fgsm.onnx --budgets 0.05,0.2 --batch 1,32 --runs 100
    python tools/width_multiple.py models/vgg_small_fgsm.onnx --budgets 0.1 --multiples 1,8 --fold
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx  # noqa: E402

from gdws_onnx import optimize  # noqa: E402
from gdws_onnx.runtime.bench import BenchConfig, compare_models, conv_macs  # noqa: E402
from gdws_onnx.graph.fold import FoldGatherPass  # noqa: E402
from gdws_onnx.provenance import versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budgets", default="0.05,0.2", help="error budgets")
    ap.add_argument("--multiples", default="1,8,16")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fold", action="store_true", help="also time each variant with its Gathers folded")
    a = ap.parse_args()
    original = onnx.load(a.model)
    multiples = [int(m) for m in a.multiples.split(",")]
    v = versions()
    print(f"{a.model}; onnxruntime {v.get('onnxruntime')}, CPU EP, threads {a.threads or 'default'}, "
          f"{a.runs} interleaved rounds")
    print("| error budget | width multiple | G per rewritten conv | conv MACs / | " +
          " | ".join(f"latency ratio b{b} [p10-p90]" for b in a.batch.split(",")) + " |")
    print("|---|---|---|---|" + "---|" * len(a.batch.split(",")))
    for eps in [float(e) for e in a.budgets.split(",")]:
        variants = {str(m): optimize(original, error_budget=eps, width_multiple=m, target="macs", verify=False) for m in multiples}
        if a.fold:
            for m in multiples:
                model, rep = variants[str(m)]
                folded = FoldGatherPass().call(onnx.ModelProto.FromString(model.SerializeToString())).model
                variants[f"{m} + fold"] = (folded, rep)
        cells = {k: [] for k in variants}
        for b in [int(x) for x in a.batch.split(",")]:
            cfg = BenchConfig(batch=b, runs=a.runs, warmup=10, threads=a.threads)
            _, ratios = compare_models([original] + [m for m, _ in variants.values()], ["original", *variants], cfg)
            for k, r in zip(variants, ratios):
                cells[k].append(f"{r.median:.2f} [{r.p10:.2f}-{r.p90:.2f}]")
        before = sum(conv_macs(original).values())
        for k, (model, rep) in variants.items():
            widths = ", ".join(str(lay.total_rank) for lay in rep.rewritten)
            cut = before / sum(conv_macs(model).values())  # from the graph: a fold widens its producer
            print(f"| {eps:g} | {k} | {widths} | {cut:.2f} | " + " | ".join(cells[k]) + " |", flush=True)


if __name__ == "__main__":
    main()
