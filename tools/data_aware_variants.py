"""Data-aware decomposition variants of issue 6 item 4 that did NOT make it into the product: kept
here so the comparison can be rerun. Output-error (whitened) per-channel decomposition, mixed
with the weight error, on clean or PGD calibration inputs, at equal conv MACs against plain
weight-space SVD (alpha = 1), measured like `validate` (first --n test images, clean and PGD-20
on each model).

Per conv and input channel c, with S_c = E[p p^T] the K x K second moment of channel c's input
patches p (calibration data, zero padding included) and s = sum_c tr(S_c) / (C K) the layer's
mean patch energy, the variant minimizes

    sum_c || (W_c - Q_c) L_c ||_F^2,   L_c L_c^T = (1 - lam) I + lam S_c / s,

i.e. (1 - lam) x weight error + lam x (normalized) output error E ||(W_c - Q_c) p||^2, exactly
(Eckart-Young on W_c L_c, mapped back by L_c^-1). lam = 0 is plain weight-space SVD; lam = 1 is
the issue's first try (per-channel whitening) when the inputs are clean. The whitened singular
values replace the weight spectrum everywhere in `optimize` (scores for the MAC knapsack, the
factors), so MACs are equal by construction. The objective ignores cross-channel terms (the
output error of a layer is not a sum over channels when channels correlate).

    nice -n 5 python tools/data_aware_variants.py models/vgg_small_fgsm.onnx --n 1000 --reductions 1.5,2 \
        --variants pgd:1,pgd:0.5,clean:0.5,clean:1 --json out/data_aware_variants.json
    (--forward-alphas --bias-correction: the same on top of forward (margin) alphas and bias correction)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from gdws_onnx import decompose, optimize  # noqa: E402
from gdws_onnx.attacks import AttackSettings  # noqa: E402
from gdws_onnx.convs import find_convs  # noqa: E402
from gdws_onnx.data import load_dataset  # noqa: E402
from gdws_onnx.forward_sensitivity import ActivationProbe, site_geometry, out_spatial  # noqa: E402
from gdws_onnx.report import json_default, versions  # noqa: E402
from gdws_onnx.sensitivity import pgd_inputs  # noqa: E402
from gdws_onnx.stats import mcnemar_exact  # noqa: E402
from gdws_onnx import validation  # noqa: E402
from gdws_onnx.validation import ValidateOptions  # noqa: E402

_evaluate_model = getattr(validation, "evaluate_model", None) or getattr(validation, "_evaluate_model")
OPTIMIZE_MODULE = sys.modules["gdws_onnx.optimize"]


def channel_second_moments(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per conv: S (C, K, K), E[p p^T] of each input channel's K-patch over samples and positions."""
    sites = [s for s in find_convs(model) if s.weight is not None]
    probe = ActivationProbe(model, [s.node.input[0] for s in sites], batch_size=100)
    acc = {s.name: None for s in sites}
    count = {s.name: 0 for s in sites}

    def add(_, vals):
        for s in sites:
            v = np.asarray(vals[s.node.input[0]], np.float64)
            k, st, p, d = site_geometry(s, v.shape[2:])
            n = len(k)
            xp = np.pad(v, [(0, 0), (0, 0)] + [(p[i], p[i + n]) for i in range(n)])
            out = out_spatial(v.shape[2:], k, st, p, d)
            cols = [xp[(slice(None), slice(None), *[slice(o * dd, o * dd + (q - 1) * ss + 1, ss)
                                                      for o, dd, q, ss in zip(offs, d, out, st)])].reshape(
                v.shape[0], v.shape[1], -1) for offs in np.ndindex(*k)]
            pat = np.stack(cols, axis=2)  # (N, C, K, P)
            g = np.einsum("nckp,nclp->ckl", pat, pat)
            acc[s.name] = g if acc[s.name] is None else acc[s.name] + g
            count[s.name] += pat.shape[0] * pat.shape[3]

    probe.run(x, on_batch=add)
    return {k: v / count[k] for k, v in acc.items()}


def whitened_spectrum(weight: np.ndarray, groups: int, second: np.ndarray, lam: float) -> decompose.Spectrum:
    """Spectrum of W_c L_c with vt mapped back through L_c^-1 (module docstring)."""
    blocks = decompose.channel_blocks(np.asarray(weight, np.float64), groups)  # (C, Mg, K)
    c, _, k = blocks.shape
    mean = np.trace(second, axis1=1, axis2=2).sum() / (c * k)
    sigma = (1 - lam) * np.eye(k)[None] + lam * second / max(mean, 1e-30)
    sigma = sigma + 1e-9 * np.eye(k)[None] * max(1.0, float(np.abs(sigma).max()))
    chol = np.linalg.cholesky(sigma)  # (C, K, K) lower: Sigma = L L^T
    u, s, vt = np.linalg.svd(blocks @ chol, full_matrices=False)
    vt_back = np.linalg.solve(np.swapaxes(chol, 1, 2), np.swapaxes(vt, 1, 2))  # L^-T V  -> (C, K, r)
    return decompose.Spectrum(u=u, s=s, vt=np.swapaxes(vt_back, 1, 2), out_channels=weight.shape[0],
                              groups=groups, kernel_shape=tuple(int(d) for d in weight.shape[2:]))


@contextlib.contextmanager
def spectra_from(model: onnx.ModelProto, seconds: dict[str, np.ndarray], lam: float):
    """Make optimize() use whitened spectra for this model's convs (matched by weight bytes)."""
    table = {}
    for s in find_convs(model):
        if s.weight is not None and s.name in seconds:
            table[s.weight.tobytes()] = whitened_spectrum(s.weight, s.group, seconds[s.name], lam)
    plain = decompose.spectrum

    def patched(weight, groups=1):
        hit = table.get(np.asarray(weight).tobytes())
        return hit if hit is not None else plain(weight, groups)

    OPTIMIZE_MODULE.decompose.spectrum = patched
    try:
        yield
    finally:
        OPTIMIZE_MODULE.decompose.spectrum = plain


def objective_check(model: onnx.ModelProto, seconds: dict[str, np.ndarray], lam: float, rank: int = 2) -> float:
    """The variant's own objective sum_c ||(W_c - Q_c) L_c||^2 summed over convs, at `rank` terms
    per channel, divided by the same objective of plain weight-space SVD at the same ranks (<= 1
    by Eckart-Young: the variant minimizes what it states, on its calibration data)."""
    mine = plain = 0.0
    for s in find_convs(model):
        if s.weight is None or s.kernel_size == 1 or s.name not in seconds:
            continue
        spec_w = whitened_spectrum(s.weight, s.group, seconds[s.name], lam)
        mine += float((spec_w.s[:, rank:] ** 2).sum())
        spec_p = decompose.spectrum(s.weight, s.group)
        blocks = decompose.channel_blocks(np.asarray(s.weight, np.float64), s.group)
        q = np.einsum("cmr,cr,crk->cmk", spec_p.u[:, :, :rank], spec_p.s[:, :rank], spec_p.vt[:, :rank])
        sw = spec_w  # L_c from the same construction
        c, _, k = blocks.shape
        second = seconds[s.name]
        mean = np.trace(second, axis1=1, axis2=2).sum() / (c * k)
        sigma = (1 - lam) * np.eye(k)[None] + lam * second / max(mean, 1e-30)
        sigma = sigma + 1e-9 * np.eye(k)[None] * max(1.0, float(np.abs(sigma).max()))
        d = blocks - q
        plain += float(np.einsum("cmk,ckl,cml->", d, sigma, d))
        del sw
    return mine / plain if plain > 0 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cal-n", type=int, default=512)
    ap.add_argument("--reductions", default="2,3,4")
    ap.add_argument("--variants", default="pgd:1,pgd:0.5,clean:0.5,clean:1",
                    help="INPUTS:LAMBDA, INPUTS clean or pgd")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--forward-alphas", action="store_true",
                    help="baseline and variants both allocate with forward (margin) alphas on 1000 training images")
    ap.add_argument("--bias-correction", action="store_true", help="baseline and variants both bias-corrected")
    ap.add_argument("--json", default="out/data_aware_variants.json")
    a = ap.parse_args()
    t_start = time.perf_counter()
    model = onnx.load(a.model)
    ds = load_dataset("fashion-mnist:test", n=a.n)
    x, y = np.ascontiguousarray(ds.x, np.float32), np.asarray(ds.y, np.int64)
    cal = load_dataset("fashion-mnist:train", n=a.cal_n)
    vopts = ValidateOptions(n=a.n, attacks=("pgd",), eps=a.eps, steps=20)
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in a.variants.split(",")]
    seconds = {}
    cal_info = {}
    for inputs in sorted({v[0] for v in variants}):
        t0 = time.perf_counter()
        xc = cal.x
        if inputs == "pgd":
            xc, info = pgd_inputs(model, cal.x, cal.y, AttackSettings(name="pgd", eps=a.eps, steps=20, seed=0),
                                  threads=1)
            cal_info["pgd"] = info
        seconds[inputs] = channel_second_moments(model, xc)
        for lam in sorted({v[1] for v in variants if v[0] == inputs}):
            ratio = objective_check(model, seconds[inputs], lam)
            cal_info[f"objective_ratio_{inputs}_{lam:g}"] = ratio
            print(f"{inputs} lam={lam:g}: own objective at 2 terms/channel = {ratio:.3f} x weight SVD's",
                  file=sys.stderr, flush=True)
        print(f"second moments on {inputs} inputs: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    common = {}
    if a.forward_alphas:
        from gdws_onnx.forward_sensitivity import forward_alphas

        common["alphas"] = forward_alphas(model, load_dataset("fashion-mnist:train", n=1000).x, threads=1,
                                          weighting="margin").alphas
    if a.bias_correction:
        common.update(bias_correction=True, data="fashion-mnist:train")

    def evaluate(m, label):
        res, _ = _evaluate_model(m, label, x, y, vopts, [], label, None)
        return res

    orig = evaluate(model, "original")
    result = {"model": a.model, "n": a.n, "cal_n": a.cal_n, "calibration": cal_info, "versions": versions(),
              "forward_alphas": a.forward_alphas, "bias_correction": a.bias_correction,
              "original": {"clean": orig.clean_accuracy, "pgd20": orig.robust_accuracy}, "rows": []}
    for r in [float(v) for v in a.reductions.split(",")]:
        opt, rep = optimize(model, mac_reduction=r, verify=False, **common)
        base = evaluate(opt, "alpha=1")
        rows = [{"variant": "weight SVD", "reduction": r, "mac_reduction": rep.mac_reduction,
                 "clean": base.clean_accuracy, "pgd20": base.robust_accuracy}]
        for inputs, lam in variants:
            with spectra_from(model, seconds[inputs], lam):
                opt, rep = optimize(model, mac_reduction=r, verify=False, **common)
            res = evaluate(opt, f"{inputs}:{lam:g}")
            rows.append({"variant": f"output error lam={lam:g}, {inputs} inputs", "reduction": r,
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
