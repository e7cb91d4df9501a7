"""Data-aware decomposition (`optimize --data-aware LAMBDA`): which blend and which calibration
inputs, at equal conv MACs against plain weight-space SVD (alpha = 1), measured like `validate`
(first --n test images, clean and PGD-20 on each model).

Per conv and input channel c the rewrite minimizes sum_c ||(W_c - Q_c) L_c||_F^2 with
L_c L_c^T = (1 - lam) I + lam S_c / s (gdws_onnx.calibrate.data_aware): lam = 0 is weight-space SVD, lam = 1
per-channel whitening (the issue's first try). INPUTS is where S_c comes from: `clean` (the first
--cal-n training images) or `pgd` (PGD-20 at --eps on those images, against the original model;
written to a temporary .npz that is passed as --data).

    nice -n 5 python tools/data_aware_variants.py models/vgg_small_fgsm.onnx --n 1000 --reductions 1.5,2 \\
        --variants pgd:1,pgd:0.5,clean:0.5,clean:1 --json out/data_aware_variants.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from gdws_onnx import optimize  # noqa: E402
from gdws_onnx.eval.attacks import AttackSettings  # noqa: E402
from gdws_onnx.data import load_dataset  # noqa: E402
from gdws_onnx.provenance import json_default, versions  # noqa: E402
from gdws_onnx.alphas.noise_gain import pgd_inputs  # noqa: E402
from gdws_onnx.core.stats import mcnemar_exact  # noqa: E402
from gdws_onnx.eval.validation import ValidateOptions, evaluate_model  # noqa: E402


def calibration_file(model: onnx.ModelProto, inputs: str, n: int, eps: float, folder: str) -> str:
    """An .npz (`x`) of the first n training images, clean or PGD-20-perturbed against `model`."""
    cal = load_dataset("fashion-mnist:train", n=n)
    x = cal.x
    if inputs == "pgd":
        x, _ = pgd_inputs(model, cal.x, cal.y, AttackSettings(name="pgd", eps=eps, steps=20, seed=0), threads=1)
    elif inputs != "clean":
        raise SystemExit(f"INPUTS must be clean or pgd, got {inputs!r}")
    path = os.path.join(folder, f"{inputs}.npz")
    np.savez(path, x=np.asarray(x, np.float32))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cal-n", type=int, default=512)
    ap.add_argument("--reductions", default="2,3,4")
    ap.add_argument("--variants", default="pgd:1,pgd:0.5,clean:0.5,clean:1", help="INPUTS:LAMBDA, INPUTS clean or pgd")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--json", default="out/data_aware_variants.json")
    a = ap.parse_args()
    t_start = time.perf_counter()
    model = onnx.load(a.model)
    ds = load_dataset("fashion-mnist:test", n=a.n)
    x, y = np.ascontiguousarray(ds.x, np.float32), np.asarray(ds.y, np.int64)
    vopts = ValidateOptions(n=a.n, attacks=("pgd",), eps=a.eps, steps=20)
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in a.variants.split(",")]

    def evaluate(m, label):
        return evaluate_model(m, label, x, y, vopts, [], label, None)[0]

    orig = evaluate(model, "original")
    result = {"model": a.model, "n": a.n, "cal_n": a.cal_n, "versions": versions(),
              "original": {"clean": orig.clean_accuracy, "pgd20": orig.robust_accuracy}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = {inputs: calibration_file(model, inputs, a.cal_n, a.eps, tmp) for inputs in {v[0] for v in variants}}
        for r in [float(v) for v in a.reductions.split(",")]:
            opt, rep = optimize(model, mac_reduction=r, verify=False)
            base = evaluate(opt, "alpha=1")
            rows = [{"variant": "weight SVD", "reduction": r, "mac_reduction": rep.mac_reduction,
                     "clean": base.clean_accuracy, "pgd20": base.robust_accuracy}]
            for inputs, lam in variants:
                opt, rep = optimize(model, mac_reduction=r, data=files[inputs], data_aware=lam, verify=False)
                res = evaluate(opt, f"{inputs}:{lam:g}")
                rows.append({"variant": f"data-aware lam={lam:g}, {inputs} inputs", "reduction": r,
                             "mac_reduction": rep.mac_reduction, "clean": res.clean_accuracy,
                             "pgd20": res.robust_accuracy,
                             "vs_svd_robust_p": mcnemar_exact(base.robust_correct, res.robust_correct).p_value})
            for row in rows:
                print(f"{r:g}x {row['variant']}: MACs/{row['mac_reduction']:.2f} clean {row['clean']:.3f} "
                      f"PGD-20 {row['pgd20']:.3f}", file=sys.stderr, flush=True)
            result["rows"] += rows
            result["seconds"] = time.perf_counter() - t_start
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1, default=json_default)
    print("| variant | R | conv MACs / | clean % | PGD-20 % |\n|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['variant']} | {row['reduction']:g} | {row['mac_reduction']:.2f} | {100 * row['clean']:.1f} | "
              f"{100 * row['pgd20']:.1f} |")
    print(f"\noriginal: clean {100 * orig.clean_accuracy:.1f}, PGD-20 {100 * orig.robust_accuracy:.1f}; "
          f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
