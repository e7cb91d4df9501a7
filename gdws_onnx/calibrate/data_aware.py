"""Data-aware GDWS: truncate each channel in a metric weighted by its input statistics.

Per conv and input channel c, with S_c = E[p p^T] the K x K second moment of channel c's input
patches p on calibration data (zero padding included) and s = sum_c tr(S_c) / (C K) the layer's
mean patch energy, the rewrite minimizes

    sum_c ||(W_c - Q_c) L_c||_F^2,   L_c L_c^T = (1 - lam) I + lam S_c / s,

i.e. (1 - lam) x the weight error + lam x the per-channel output error E ||(W_c - Q_c) p||^2 / s,
exactly (`decompose.metric_spectrum`). lam = 0 is weight-space SVD; lam = 1 is per-channel
whitening. Cross-channel terms of the output error are ignored.

Why a blend: on the zoo VGG, pure whitening (lam = 1, clean calibration images) lost robust
accuracy against weight-space SVD at equal MACs, as clean-data whitening discards the
low-variance directions attacks use; lam = 0.5 beat it at MACs / 1.5, 2 and 3; at / 4 both collapse (docs/results.md,
"Accuracy-aware allocation"; tools/data_aware_variants.py compares the blends).
"""

from __future__ import annotations

import numpy as np
import onnx

from gdws_onnx.core.decompose import channel_blocks
from gdws_onnx.core.geometry import patches
from gdws_onnx.graph.convs import ConvSite, site_geometry
from gdws_onnx.runtime.session import make_session, run_batches, with_outputs

PATCH_ELEMENTS = 1 << 24  # float64 patch values held at once while accumulating (128 MB)


def blended_metric(second: np.ndarray, lam: float) -> np.ndarray:
    """(1 - lam) I + lam S_c / s for second moments S (C, K, K), s their mean diagonal entry."""
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    second = np.asarray(second, np.float64)
    c, k, _ = second.shape
    mean = float(np.trace(second, axis1=1, axis2=2).sum()) / (c * k)
    metric = (1 - lam) * np.eye(k)[None] + lam * second / max(mean, 1e-30)
    # a channel that is always zero (or a patch element that always falls in the padding) has a
    # singular S_c; a tiny ridge keeps the Cholesky factor defined without changing the ranking
    return metric + 1e-9 * max(1.0, float(np.abs(metric).max())) * np.eye(k)[None]


def channel_objective(weight: np.ndarray, approx: np.ndarray, groups: int, metric: np.ndarray) -> float:
    """sum_c ||(W_c - Q_c) L_c||_F^2 = sum_c tr((W_c - Q_c) metric_c (W_c - Q_c)^T)."""
    d = channel_blocks(np.asarray(weight, np.float64) - np.asarray(approx, np.float64), groups)
    return float(np.einsum("cmk,ckl,cml->", d, np.asarray(metric, np.float64), d))


def _accumulate(v: np.ndarray, site: ConvSite) -> tuple[np.ndarray, int]:
    """Sum over samples and output positions of each channel's patch outer product (C, K, K),
    and how many patches that was; in chunks of samples to bound memory."""
    geometry = site_geometry(site, v.shape[2:])
    total, count = None, 0
    per_sample = max(1, v.shape[1] * int(np.prod(v.shape[2:])) * site.kernel_size)
    step = max(1, PATCH_ELEMENTS // per_sample)
    for s in range(0, len(v), step):
        pat = patches(v[s:s + step], *geometry)  # (N, C, K, P)
        g = np.einsum("nckp,nclp->ckl", pat, pat)
        total = g if total is None else total + g
        count += pat.shape[0] * pat.shape[3]
    return total, count


def channel_second_moments(model: onnx.ModelProto, feeds: dict[str, np.ndarray], sites: list[ConvSite],
                           batch_size: int = 64, threads: int | None = None) -> dict[str, np.ndarray]:
    """S_c = E[p p^T] (C, K, K) per conv site, over the samples of `feeds` (input name -> array,
    samples on axis 0) and all output positions, from one ONNX Runtime pass of `model`."""
    wanted = list(dict.fromkeys(s.node.input[0] for s in sites))
    sess = make_session(with_outputs(model, wanted), threads=threads)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {s.name: 0 for s in sites}
    for values in run_batches(sess, feeds, wanted, batch_size):
        for site in sites:
            g, c = _accumulate(np.asarray(values[site.node.input[0]], np.float64), site)
            sums[site.name] = g if site.name not in sums else sums[site.name] + g
            counts[site.name] += c
    return {name: sums[name] / counts[name] for name in sums}
