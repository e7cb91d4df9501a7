"""A against B, interleaved, per batch: the median per-round latency ratio B / A with its
distribution-free 95 % confidence interval (the interval `optimize --target latency` decides
with), and the verdict. `onnx-gdws bench` prints the 10-90 % spread instead.

    python tools/compare_latency.py A.onnx B.onnx --batch 1,32 --runs 400 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gdws_onnx.runtime.bench import BenchConfig, compare_models, environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--runs", type=int, default=200, help="interleaved rounds per batch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ep", default="cpu")
    args = ap.parse_args()
    env = environment(BenchConfig(ep=args.ep, threads=args.threads))
    print(f"{env['ep']} EP, {env['cpu']}, threads {env['threads']}, onnxruntime {env['onnxruntime']}, spinning off")
    for b in (int(x) for x in args.batch.split(",")):
        cfg = BenchConfig(ep=args.ep, batch=b, threads=args.threads, runs=args.runs)
        stats, (r,) = compare_models([args.a, args.b], ["A", "B"], cfg)
        lo, hi = r.bounds()
        verdict = "B faster" if hi < 1 else "B slower" if lo > 1 else "undecided"
        print(f"batch {b}: A {stats[0].median_ms:.3f} ms, B {stats[1].median_ms:.3f} ms; B / A {r.median:.3f} "
              f"[{lo:.3f}-{hi:.3f}] (95 % CI of the median, {r.rounds} rounds; p10-p90 {r.p10:.3f}-{r.p90:.3f}): {verdict}")


if __name__ == "__main__":
    main()
