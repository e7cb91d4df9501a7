"""`optimize --target latency` on onnx's bundled light zoo: is the result ever slower?

For each model: optimize with --target latency on the CPU EP (default error budget 0.1, batch 1:
these models have a fixed batch of 1), then time the returned model against the original,
interleaved, in a fresh run, and print the median ratio with its 10-90 % spread.

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
        out, rep = optimize(model, target="latency", runs=10)
        secs = time.perf_counter() - t0
        _, (r,) = compare_models([model, out], ["original", "optimized"], BenchConfig(runs=a.runs, warmup=3))
        row = {"model": name, "rewritten": len(rep.rewritten), "convs": len(rep.layers),
               "conv_mac_reduction": rep.mac_reduction, "optimize_s": secs,
               "ratio": [r.median, r.p10, r.p90], "original_ms": r.baseline_ms}
        rows.append(row)
        print(f"{name:26s} rewritten {row['rewritten']:3d}/{row['convs']:3d}  conv MACs / {rep.mac_reduction:5.2f}  "
              f"optimized/original {r.median:.3f} [{r.p10:.3f}-{r.p90:.3f}]  (original {r.baseline_ms:.1f} ms, "
              f"optimize {secs:.0f} s)", flush=True)
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"environment": environment(BenchConfig()), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
