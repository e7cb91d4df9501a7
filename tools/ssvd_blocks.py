"""Latency and starting accuracy of spatial SVD with ranks in channel blocks
(`optimize --conv ssvd --mac-reduction R --width-multiple N`).

ONNX Runtime's CPU EP runs a conv in its blocked NCHWc layout only when its channel counts are
multiples of the block (16 with AVX-512, 8 with AVX2); a spatial-SVD pair at rank 13 falls back to
the plain kernel and pays layout reorders on both sides. This script rewrites the model at each
MAC cut with ranks free (multiple 1) and in blocks, plus the floor of the blocked form (every
rank one block: `rank_fraction` -> the smallest rank, rounded up), times them all interleaved
against the original (one thread, spinning off: `bench.compare_models`), and scores each on the
first N test images before any recovery: clean accuracy and top-1 agreement with the original.
That is a cheap proxy for where recovery starts, not robust accuracy. `--floors 4,8` adds models
with every rank at 4, 8 (blocks of that size), and `--int8` the static INT8 version of each model
(`optimize(conv="off", quantize="int8", mixed_precision=False)`: every conv INT8, calibrated on the training images): the latency floors
of any spatial SVD of the model, float and INT8.

    python tools/ssvd_blocks.py models/vgg16_fmnist_fgsm.onnx --cuts 16,24 --block-cuts 10,12,14 \\
        --multiple 16 --batch 1,32 --runs 100
    python tools/ssvd_blocks.py models/vgg16_fmnist_fgsm.onnx --cuts "" --block-cuts "" --floors 4,8 \\
        --int8 --batch 1 --runs 100
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from gdws_onnx import optimize  # noqa: E402
from gdws_onnx.data import load_dataset  # noqa: E402
from gdws_onnx.peers.spatial_svd import SpatialSVDPass  # noqa: E402
from gdws_onnx.provenance import versions  # noqa: E402
from gdws_onnx.runtime.bench import BenchConfig, compare_models, environment, format_ratio  # noqa: E402
from gdws_onnx.runtime.session import make_session  # noqa: E402


def predictions(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Top-1 classes of `model` on x in ONNX Runtime."""
    sess = make_session(model, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(axis=1)


def split(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def variant(original: onnx.ModelProto, multiple: int, cut: float | None) -> tuple[onnx.ModelProto, list[int], float]:
    """The spatial-SVD rewrite at conv MACs / cut (None: every rank one block), its ranks and MAC cut."""
    model = onnx.ModelProto.FromString(original.SerializeToString())
    budget = dict(mac_reduction=cut) if cut is not None else dict(rank_fraction=1e-9)
    report = SpatialSVDPass(rank_multiple=multiple, **budget).call(model).report
    return model, [layer.rank for layer in report.rewritten], report.mac_reduction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--cuts", default="16,24", help="MAC cuts with free ranks")
    ap.add_argument("--block-cuts", default="10,12,14", help="MAC cuts with ranks in blocks")
    ap.add_argument("--multiple", type=int, default=16, help="the block (16: AVX-512's NCHWc block)")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=1000, help="test images for the accuracy proxy")
    ap.add_argument("--floors", default="", help="also every rank at each of these (blocks of that size)")
    ap.add_argument("--int8", action="store_true", help="also the static INT8 version of each model")
    a = ap.parse_args()
    original = onnx.load(a.model)
    data = load_dataset("fashion-mnist:test")
    x, y = data.x[:a.n].astype(np.float32), data.y[:a.n]
    variants = {f"/ {c} free": variant(original, 1, float(c)) for c in split(a.cuts)}
    variants |= {f"/ {c} blocks of {a.multiple}": variant(original, a.multiple, float(c)) for c in split(a.block_cuts)}
    for r in [a.multiple] + [int(f) for f in split(a.floors)]:
        variants[f"every rank {r} (floor)"] = variant(original, r, None)
    if a.int8:
        for k, (model, ranks, cut) in list(variants.items()):
            q, _ = optimize(model, conv="off", quantize="int8", data="fashion-mnist:train", target="macs", verify=False,
                            mixed_precision=False)
            variants[f"{k}, INT8"] = (q, ranks, cut)
    env = environment(BenchConfig(threads=a.threads))
    v = versions()
    print(f"{a.model}; {env['cpu']}, onnxruntime {v.get('onnxruntime')}, CPU EP, {a.threads} thread(s), "
          f"{a.runs} interleaved rounds; accuracy on the first {a.n} test images, before recovery")
    ref = predictions(original, x)
    print(f"original: clean {100 * np.mean(ref == y):.1f} %")
    batches = [int(b) for b in a.batch.split(",")]
    cells: dict[str, list[str]] = {k: [] for k in variants}
    for b in batches:
        cfg = BenchConfig(batch=b, runs=a.runs, warmup=10, threads=a.threads)
        _, ratios = compare_models([original] + [m for m, _, _ in variants.values()], ["original", *variants], cfg)
        for k, r in zip(variants, ratios):
            cells[k].append(format_ratio(r, 3))
    print("| ranks | per conv | conv MACs / | clean % | agrees % | " +
          " | ".join(f"latency b{b}, median [95 % CI]" for b in batches) + " |")
    print("|---|---|---|---|---|" + "---|" * len(batches))
    for k, (model, ranks, cut) in variants.items():
        pred = predictions(model, x)
        print(f"| {k} | {', '.join(map(str, ranks))} | {cut:.1f} | {100 * np.mean(pred == y):.1f} | "
              f"{100 * np.mean(pred == ref):.1f} | " + " | ".join(cells[k]) + " |", flush=True)


if __name__ == "__main__":
    main()
