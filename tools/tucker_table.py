"""Tucker-2 against spatial SVD and GDWS at equal relative weight error, per conv (issue 25, item 2).

For every 2-D group-1 conv with a spatial kernel, the conv MACs each factorization needs at the
lowest ranks whose relative weight error ||W - W'||^2 / ||W||^2 is at most E:
  - Tucker-2 (HOSVD, Kim et al. 2016): 1x1 conv C -> r1, k x k core r1 -> r2, 1x1 conv r2 -> M.
    U_M, U_C: left singular vectors of the mode-M and mode-C unfoldings; core G = W x_M U_M^T x_C U_C^T.
    The truncation to (r2, r1) keeps ||G[:r2, :r1]||^2 of the energy (exact, orthogonal bases),
    so every (r1, r2) pair's error is read off one cumulative sum; the cheapest pair within E wins.
    MACs per sample: H W C r1 (at the input's size) + H' W' (r1 r2 k + r2 M).
  - spatial SVD: `core.spatial_svd` (rank_at_error, ssvd_macs_per_rank).
  - GDWS: `core.allocate.relative_lego` on the per-channel spectrum, MACs `gdws_cost_per_pixel`.

    python tools/tucker_table.py [--error 0.05 0.1] [MODEL.onnx ...]   (default: the zoo and onnx's light zoo)

Numpy only (a few lines), not tensorly: HOSVD of a 4-D tensor is two SVDs and one contraction,
and the exact error of every rank pair comes from one cumulative sum that tensorly does not expose.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from gdws_onnx.core import allocate, decompose  # noqa: E402
from gdws_onnx.core import spatial_svd as ssvd  # noqa: E402
from gdws_onnx.graph.convs import find_convs  # noqa: E402
from gdws_onnx.graph.spatial_svd import geometry, ssvd_skip_reason  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def tucker2_macs_at_error(weight: np.ndarray, in_hw: int, out_hw: int, eps: float) -> tuple[int, int, int]:
    """(MACs per sample, r1, r2) of the cheapest Tucker-2 truncation within relative error eps."""
    w = weight.astype(np.float64)
    m, c, kh, kw = w.shape
    u_m = np.linalg.svd(w.reshape(m, -1), full_matrices=False)[0]
    u_c = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(c, -1), full_matrices=False)[0]
    core = np.einsum("mckl,mi->ickl", w, u_m)  # two contractions, not one four-index einsum
    core = np.einsum("ickl,cj->ijkl", core, u_c)  # (r2_max, r1_max, kh, kw)
    kept = np.cumsum(np.cumsum((core**2).sum(axis=(2, 3)), axis=0), axis=1)  # [r2 - 1, r1 - 1]
    total = float((w**2).sum())
    ok = kept >= (1 - eps) * total - 1e-12 * total
    r2s, r1s = np.nonzero(ok)
    r2s, r1s = r2s + 1, r1s + 1
    macs = in_hw * c * r1s + out_hw * (r1s * r2s * kh * kw + r2s * m)
    i = int(np.argmin(macs))
    return int(macs[i]), int(r1s[i]), int(r2s[i])


def rows(path: str, errors: list[float]) -> list[tuple]:
    """One row per eligible conv and error: MACs of dense, GDWS, spatial SVD, Tucker-2, the winner."""
    model = onnx.load(path)
    out = []
    for site in find_convs(model, os.path.dirname(path)):
        if ssvd_skip_reason(site) or site.pixels is None:
            continue
        geo = geometry(site)
        dense = site.pixels * site.macs_per_pixel
        spec_g, spec_s = decompose.spectrum(site.weight, 1), ssvd.spatial_spectrum(site.weight)
        for eps in errors:
            ranks, _ = allocate.relative_lego(decompose.scores(spec_g), eps, site.weight.dtype)
            gdws = site.pixels * decompose.gdws_cost_per_pixel(spec_g, ranks)
            s = ssvd.rank_at_error(spec_s.s, eps) * ssvd.ssvd_macs_per_rank(spec_s.weight_shape, geo)
            t, r1, r2 = tucker2_macs_at_error(site.weight, geo.in_h * geo.in_w, site.pixels, eps)
            best = min((("gdws", gdws), ("ssvd", s), ("tucker2", t)), key=lambda x: x[1])[0]
            out.append((os.path.basename(path), site.name, eps, dense, gdws, s, t, r1, r2, best))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--error", type=float, nargs="+", default=[0.05, 0.1])
    a = ap.parse_args(argv)
    paths = a.models or ([os.path.join(ROOT, "models", f) for f in sorted(os.listdir(os.path.join(ROOT, "models")))
                          if f.endswith(".onnx")]
                         + [os.path.join(LIGHT, f) for f in sorted(os.listdir(LIGHT)) if f.endswith(".onnx")])
    print("| model | conv | error | dense / GDWS | dense / spatial SVD | dense / Tucker-2 (r1, r2) | fewest MACs |")
    print("|---|---|---|---|---|---|---|")
    wins: dict[str, int] = {}
    for path in paths:
        for model, conv, eps, dense, g, s, t, r1, r2, best in rows(path, a.error):
            wins[best] = wins.get(best, 0) + 1
            print(f"| {model} | {conv} | {eps:g} | {dense / g:.2f} | {dense / s:.2f} | {dense / t:.2f} ({r1}, {r2}) "
                  f"| {best} |")
    print(f"\nfewest MACs at equal error, (conv, error) pairs: {wins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
