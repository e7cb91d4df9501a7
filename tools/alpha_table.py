"""Accuracy-aware allocation and data-aware repair at equal conv MACs (issue 6's table).

For a zoo model, at conv-MAC reductions R (default 2, 3, 4; `optimize(mac_reduction=R)`), clean
and PGD-20 accuracy of:

  alpha=1            plain weight-space SVD, every weight counts the same
  grad (clean)       noise-gain alphas (`sensitivity.noise_gain_alphas`) on --cal-n clean training images
  grad (PGD)         the same at PGD-20 inputs (eps --eps) of those images
  forward (noise-gain)  forward-only alphas (`alphas.forward.forward_alphas`, ONNX Runtime, no
                     torch) with eq. 8's 1/(2 d^2) weighting
  forward (margin)   the same without it (forward_alphas' default)
  bias corr.         alpha=1 + `bias_correction` (mean output error on the same training images)
  bias corr. + grad  grad (clean) alphas + bias correction
  bias corr. + forward (margin)  forward (margin) alphas + bias correction
  data-aware         alpha=1 with `optimize(data_aware=0.5)` (truncation in the blended weight/output
                     metric, second moments on the --cal-n calibration images)
  data-aware + forward (margin)            the same allocated with forward (margin) alphas
  data-aware + forward (margin) + bias corr.  and bias-corrected
  (also selectable with --methods: "bias corr. + forward (noise-gain)")

Every model is measured like `validate(orig, opt, n=N, attacks=("pgd",), eps=0.1, steps=20)`
(the same first N test images, clean accuracy and white-box PGD-20 on each model, scored in ONNX
Runtime): it calls validation.evaluate_model per model, so the original is attacked once
instead of once per row; the numbers are those validate reports. Writes JSON (rewritten after
every row) and prints a Markdown table; `--combine A.json B.json ...` prints one table from
several runs on the same model and images.

    nice -n 5 python tools/alpha_table.py models/vgg_small_fgsm.onnx --n 1000 --json out/alpha_table.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from gdws_onnx import optimize  # noqa: E402
from gdws_onnx.eval.attacks import AttackSettings  # noqa: E402
from gdws_onnx.data import load_dataset  # noqa: E402
from gdws_onnx.alphas.forward import forward_alphas  # noqa: E402
from gdws_onnx.provenance import json_default, versions  # noqa: E402
from gdws_onnx.alphas.noise_gain import noise_gain_alphas  # noqa: E402
from gdws_onnx.core.stats import mcnemar_exact, proportion  # noqa: E402
from gdws_onnx.eval import validation  # noqa: E402
from gdws_onnx.eval.validation import ValidateOptions  # noqa: E402

_evaluate_model = validation.evaluate_model  # one model's clean + PGD numbers, as validate() computes them

DATA_AWARE = 0.5  # lam of the data-aware rows (tools/data_aware_variants.py compares others)
# method -> (alphas key or None, bias correction, data-aware lam or None)
METHODS = {
    "alpha=1": (None, False, None),
    "grad (clean)": ("grad_clean", False, None),
    "grad (PGD)": ("grad_pgd", False, None),
    "forward (noise-gain)": ("forward", False, None),
    "forward (margin)": ("forward_margin", False, None),
    "bias corr.": (None, True, None),
    "bias corr. + grad": ("grad_clean", True, None),
    "bias corr. + forward (noise-gain)": ("forward", True, None),
    "bias corr. + forward (margin)": ("forward_margin", True, None),
    "data-aware": (None, False, DATA_AWARE),
    "data-aware + forward (margin)": ("forward_margin", False, DATA_AWARE),
    "data-aware + forward (margin) + bias corr.": ("forward_margin", True, DATA_AWARE),
}
DEFAULT_METHODS = ("alpha=1", "grad (clean)", "grad (PGD)", "forward (noise-gain)", "forward (margin)", "bias corr.",
                   "bias corr. + grad", "bias corr. + forward (margin)")


def compute_alphas(model: onnx.ModelProto, keys: set[str], cal_spec: str, cal_n: int, eps: float,
                   threads: int) -> tuple[dict, dict]:
    """The alphas each method needs, and how long each took."""
    ds = load_dataset(cal_spec, n=cal_n)
    out, info = {}, {}
    for key in sorted(keys):
        t0 = time.perf_counter()
        if key == "grad_clean":
            res = noise_gain_alphas(model, ds.x, threads=threads)
        elif key == "grad_pgd":
            res = noise_gain_alphas(model, ds.x, y=ds.y, threads=threads,
                                    attack=AttackSettings(name="pgd", eps=eps, steps=20, seed=0))
        elif key == "forward":
            res = forward_alphas(model, ds.x, threads=threads, weighting="noise-gain")
        elif key == "forward_margin":
            res = forward_alphas(model, ds.x, threads=threads, weighting="margin")
        else:
            raise ValueError(key)
        out[key] = res.alphas
        info[key] = {"seconds": time.perf_counter() - t0, "settings": res.settings,
                     "layer_totals": {k: float(v.sum()) for k, v in res.alphas.items()},
                     "attack_accuracy": (res.attack or {}).get("accuracy_on_inputs")}
        print(f"alphas {key}: {info[key]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return out, info


def evaluate(model: onnx.ModelProto, label: str, x: np.ndarray, y: np.ndarray, opts: ValidateOptions) -> dict:
    t0 = time.perf_counter()
    warnings: list[str] = []
    res, _ = _evaluate_model(model, label, x, y, opts, warnings, label, None)
    return {"clean": res.clean_accuracy, "pgd20": res.robust_accuracy, "predictions": res.predictions,
            "robust_correct": res.robust_correct, "gradient_source": res.gradient_source,
            "warnings": warnings, "seconds": time.perf_counter() - t0}


def markdown(result: dict) -> str:
    rs = result["reductions"]
    head = ["alphas / repair"] + [f"{r:g}x {what}" for r in rs for what in ("clean", "PGD-20")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    o = result["original"]
    lines.append("| original | " + " | ".join(f"{100 * o['clean']:.1f} | {100 * o['pgd20']:.1f}" for _ in rs) + " |")
    for m in result["methods"]:
        cells = []
        for r in rs:
            row = next((x for x in result["rows"] if x["method"] == m and x["reduction"] == r), None)
            if row is None:
                cells += ["", ""]
                continue
            star = "*" if row["vs_alpha1_robust_p"] is not None and row["vs_alpha1_robust_p"] < 0.05 else ""
            cells += [f"{100 * row['clean']:.1f}", f"{100 * row['pgd20']:.1f}{star}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine(paths: list[str]) -> dict:
    """One result from several runs on the same model and test images (later files win a
    (method, reduction) cell); refuses runs whose original-model numbers differ."""
    runs = [json.load(open(p)) for p in paths]
    first = runs[0]
    for r in runs[1:]:
        same = (r["model"], r["data"]["n"], r["original"]["clean"], r["original"]["pgd20"]) == \
            (first["model"], first["data"]["n"], first["original"]["clean"], first["original"]["pgd20"])
        if not same:
            raise SystemExit("runs differ in model, test images or the original's accuracy: not one table")
    rows = {(row["method"], row["reduction"]): row for r in runs for row in r["rows"]}
    methods = list(dict.fromkeys(m for r in runs for m in r["methods"]))
    return {**first, "reductions": sorted({red for _, red in rows}), "methods": methods, "rows": list(rows.values())}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--combine":  # tools/alpha_table.py --combine a.json b.json ...
        print(markdown(combine(sys.argv[2:])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=1000, help="test images (validate's n)")
    ap.add_argument("--data", default="fashion-mnist:test")
    ap.add_argument("--cal", default="fashion-mnist:train", help="calibration / sensitivity data")
    ap.add_argument("--cal-n", type=int, default=1000)
    ap.add_argument("--reductions", default="2,3,4")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the gradient alphas")
    ap.add_argument("--json", default="out/alpha_table.json")
    a = ap.parse_args()
    t_start = time.perf_counter()
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}")
    reductions = [float(r) for r in a.reductions.split(",")]
    model = onnx.load(a.model)
    ds = load_dataset(a.data, n=a.n)
    x, y = np.ascontiguousarray(ds.x, np.float32), np.asarray(ds.y, np.int64)
    vopts = ValidateOptions(data=a.data, n=a.n, attacks=("pgd",), eps=a.eps, steps=20)
    keys = {METHODS[m][0] for m in methods} - {None}
    alphas, alpha_info = compute_alphas(model, keys, a.cal, a.cal_n, a.eps, a.threads)
    orig = evaluate(model, "original", x, y, vopts)
    print(f"original: clean {orig['clean']:.3f} PGD-20 {orig['pgd20']:.3f} ({orig['seconds']:.0f} s)",
          file=sys.stderr, flush=True)
    result = {"model": a.model, "data": {"test": ds.name, "n": len(x), "calibration": a.cal, "cal_n": a.cal_n},
              "attack": vopts.settings("pgd").to_dict(), "reductions": reductions, "methods": methods,
              "alphas": alpha_info, "original": orig, "rows": [], "versions": versions()}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    base: dict[float, dict] = {}
    for r in reductions:
        for m in methods:
            key, bias, lam = METHODS[m]
            t0 = time.perf_counter()
            opt, rep = optimize(model, mac_reduction=r, alphas=alphas.get(key), bias_correction=bias,
                                data_aware=lam, data=a.cal if bias or lam else None, verify=False)
            t_opt = time.perf_counter() - t0
            ev = evaluate(opt, m, x, y, vopts)
            clean_correct = np.asarray(ev["predictions"]) == y
            ci = proportion(clean_correct)
            row = {"method": m, "reduction": r, "conv_mac_reduction": rep.mac_reduction,
                   "rewritten": len(rep.rewritten), "ranks": {lr.name: lr.total_rank for lr in rep.rewritten},
                   "clean": ev["clean"], "pgd20": ev["pgd20"], "clean_interval": [ci.low, ci.high],
                   "agreement": float(np.mean(np.asarray(ev["predictions"]) == np.asarray(orig["predictions"]))),
                   "optimize_seconds": t_opt, "evaluate_seconds": ev["seconds"], "warnings": ev["warnings"],
                   "bias_correction": rep.bias_correction, "robust_correct": ev["robust_correct"],
                   "clean_correct": [bool(v) for v in clean_correct],
                   "vs_alpha1_robust_p": None, "vs_alpha1_clean_p": None}
            if m == "alpha=1":
                base[r] = row
            elif r in base:
                row["vs_alpha1_robust_p"] = mcnemar_exact(base[r]["robust_correct"], ev["robust_correct"]).p_value
                row["vs_alpha1_clean_p"] = mcnemar_exact(base[r]["clean_correct"], clean_correct).p_value
            result["rows"].append(row)
            print(f"{r:g}x {m}: MACs/{rep.mac_reduction:.2f} clean {ev['clean']:.3f} PGD-20 {ev['pgd20']:.3f} "
                  f"({t_opt:.0f} + {ev['seconds']:.0f} s)", file=sys.stderr, flush=True)
            result["seconds"] = time.perf_counter() - t_start
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1, default=json_default)
    text = markdown(result)
    print(text)
    print(f"\n{a.n} test images, PGD-20 L-inf eps {a.eps:g} (step eps/4, 1 random start) on each model; * robust "
          "accuracy differs from alpha=1 at the same R (exact McNemar p < 0.05); total "
          f"{result['seconds']:.0f} s")
    with open(os.path.splitext(a.json)[0] + ".md", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
