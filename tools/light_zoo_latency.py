"""`optimize --target latency` (conv="auto", every family) on onnx's bundled light zoo: is the
result ever slower, and are its outputs verified?

For each model: optimize with --target latency on the CPU EP, one thread (default budget, batch 1:
these models have a fixed batch of 1), then time the returned model against the original,
interleaved, in a fresh run, and print the median ratio with its 95 % interval, the families
that won, and whether the verification in ONNX Runtime passed (and whether it was vacuous: the
light zoo's outputs barely depend on their inputs).

    python tools/light_zoo_latency.py [--runs 30] [--models light_vgg19.onnx ...] [--json out/light_zoo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx  # noqa: E402

from gdws_onnx import optimize  # noqa: E402
from gdws_onnx.runtime.bench import BenchConfig, compare_models, environment  # noqa: E402

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    names = a.models or sorted(f for f in os.listdir(LIGHT) if f.endswith(".onnx"))
    rows = []
    print(json.dumps(environment(BenchConfig())), flush=True)
    for name in names:
        model = onnx.load(os.path.join(LIGHT, name))
        t0 = time.perf_counter()
        out, rep = optimize(model, target="latency", runs=10, threads=1)
        secs = time.perf_counter() - t0
        _, (r,) = compare_models([model, out], ["original", "optimized"], BenchConfig(runs=a.runs, warmup=3, threads=1))
        lo, hi = r.bounds()
        v = rep.verification
        row = {"model": name, "rewritten": len(rep.rewritten), "convs": len(rep.layers),
               "families": {k: len(c) for k, c in rep.families.items()},
               "conv_mac_reduction": rep.mac_reduction, "optimize_s": secs,
               "ratio": [r.median, lo, hi], "original_ms": r.baseline_ms,
               "verified": v.ran and v.passed, "vacuous": v.vacuous,
               "max_relative_error": max((o.relative for o in v.outputs), default=None)}
        rows.append(row)
        print(f"{name:26s} rewritten {row['rewritten']:3d}/{row['convs']:3d} {row['families']}  conv MACs / "
              f"{rep.mac_reduction or 1:5.2f}  optimized/original {r.median:.3f} [{lo:.3f}-{hi:.3f}]  (original "
              f"{r.baseline_ms:.1f} ms, optimize {secs:.0f} s; verified {row['verified']}"
              f"{', vacuous' if v.vacuous else ''}, relative error {row['max_relative_error']})", flush=True)
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"environment": environment(BenchConfig()), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
