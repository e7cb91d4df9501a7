"""Which gradient source should `validate` use by default? Coverage, correctness and speed.

For each model: does each source build, does it pass the pre-attack gate (ORT parity and
finite differences on ORT), and how long does one cross-entropy input gradient of a batch take
(median of --runs, sources interleaved). Also the GDWS rewrite of each model, since that is
what validate attacks.

    python tools/compare_gradient_sources.py --models models/vgg_small_fgsm.onnx vgg16 resnet18 \
        --batch 64 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gdws_onnx import optimize  # noqa: E402
from gdws_onnx.runtime.bench import BenchConfig, environment  # noqa: E402
from gdws_onnx.errors import GDWSError  # noqa: E402
from gdws_onnx.eval.gradients import SOURCES, OrtClassifier, check_gradient_source, input_shape, make_source  # noqa: E402
from models.reference import build_reference  # noqa: E402


def _load(spec: str) -> tuple[str, onnx.ModelProto]:
    if os.path.isfile(spec):
        return os.path.basename(spec), onnx.load(spec)
    return spec, build_reference(spec)


def _inputs(model: onnx.ModelProto, batch: int) -> np.ndarray:
    dims, _ = input_shape(model)
    shape = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]
    return np.random.default_rng(0).random(shape).astype(np.float32)


def compare(name: str, model: onnx.ModelProto, batch: int, runs: int) -> list[dict]:
    x = _inputs(model, batch)
    ort = OrtClassifier(model, batch_size=batch)
    y = ort(x).argmax(1)
    rows, sources = [], {}
    for s in SOURCES:
        row = {"model": name, "source": s}
        try:
            src = make_source(model, s, batch_size=batch)
            chk = check_gradient_source(src, ort, x[:8], y[:8])
            row.update(gate=chk.passed, fd_median_rel_error=chk.fd_median_relative_error,
                       logits_err=chk.logits_max_abs_error, note=chk.message)
            src.ce_grad(x, y)  # warm-up (graph building, first-run allocation)
            sources[s] = src
        except GDWSError as e:
            row.update(gate=False, note=str(e))
        rows.append(row)
    times: dict[str, list[float]] = {s: [] for s in sources}
    for r in range(runs):
        order = list(sources) if r % 2 == 0 else list(reversed(sources))
        for s in order:
            t0 = time.perf_counter()
            sources[s].ce_grad(x, y)
            times[s].append(time.perf_counter() - t0)
    for row in rows:
        if row["source"] in times:
            row["ce_grad_ms_median"] = 1000 * float(np.median(times[row["source"]]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--error-budget", type=float, default=0.1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for spec in a.models:
        name, m = _load(spec)
        rows += compare(name, m, a.batch, a.runs)
        g, _ = optimize(m, error_budget=a.error_budget, target="macs", verify=False)
        rows += compare(name + " (GDWS)", g, a.batch, a.runs)
    import torch

    env = {**environment(BenchConfig()), "torch": torch.__version__, "batch": a.batch}
    print(json.dumps(env))
    print(f"{'model':32s} {'source':8s} {'gate':5s} {'fd med rel':>10s} {'ms/batch':>9s}  note")
    for r in rows:
        ms = f"{r['ce_grad_ms_median']:.1f}" if "ce_grad_ms_median" in r else "-"
        fd = f"{r['fd_median_rel_error']:.1e}" if "fd_median_rel_error" in r else "-"
        print(f"{r['model']:32s} {r['source']:8s} {str(r['gate']):5s} {fd:>10s} {ms:>9s}  {r['note'][:90]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
