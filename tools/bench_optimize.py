"""Time `optimize` on a ResNet-50-size model against just loading and saving that model.

    python tools/bench_optimize.py [--repeats 5] [--mac-reduction 2]

Builds the random-weight ImageNet ResNet-50 of models/reference.py (about 25.5 M parameters),
saves it, then alternates (load + save) and (load + optimize + save) runs, verification off
(verification runs ONNX Runtime on both models and is timed separately). Prints medians and
the ratio; the target is optimize <= 2x load+save.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import onnx  # noqa: E402

from gdws_onnx.graph.model_io import load_model, save_model  # noqa: E402
from gdws_onnx.pipeline.optimize import OptimizeOptions, optimize_loaded  # noqa: E402
from models.reference import build_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mac-reduction", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "resnet50.onnx"), os.path.join(tmp, "out.onnx")
        model = build_reference("resnet50")
        onnx.save(model, src)
        params = sum(int(onnx.numpy_helper.to_array(t).size) for t in model.graph.initializer)
        del model
        base, opt, stages = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            save_model(load_model(src).model, out)
            base.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loaded = load_model(src)
            optimized, report = optimize_loaded(loaded, OptimizeOptions(mac_reduction=args.mac_reduction,
                                                                        verify=False))
            save_model(optimized, out)
            opt.append(time.perf_counter() - t0)
            stages.append(report.timings)
        t0 = time.perf_counter()
        optimized, report = optimize_loaded(load_model(src), OptimizeOptions(mac_reduction=args.mac_reduction))
        verify_time = report.timings["verify"]
    mb, mo = statistics.median(base), statistics.median(opt)
    print(f"model: reference ResNet-50, random weights, {params / 1e6:.1f} M parameters, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), python {platform.python_version()}")
    print(f"rewrote {len(report.rewritten)}/{len(report.layers)} convs, conv MACs / {report.mac_reduction:.2f}")
    print(f"load+save           median {mb:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in base)})")
    print(f"load+optimize+save  median {mo:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in opt)})")
    for key in ("analyze", "decompose", "rewrite"):
        print(f"  {key:10s} median {statistics.median(s[key] for s in stages):.3f} s")
    print(f"ratio (optimize / load+save): {mo / mb:.2f}x   target <= 2x")
    print(f"verification (not in the ratio): {verify_time:.2f} s")


if __name__ == "__main__":
    main()
