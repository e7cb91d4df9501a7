"""Per-channel SVD of a convolution weight and the GDWS factors it yields (pure numpy).

A Conv weight W has shape (M, C/groups, *kernel). For input channel c (in group j) the
block W_c = W[rows of group j, c_local] reshaped to (M/groups) x K, K = prod(kernel), acts
on channel c's K-patch. GDWS keeps g_c rank-1 terms of each block:
W_c ~ P_c D_c with P_c = U_c[:, :g] diag(s_c[:g]) and D_c = V_c[:g]^T (Eckart-Young optimal),
and error e = sum_c alpha_c sum_{i >= g_c} s_ci^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spectrum:
    """Per-channel SVD of one conv weight.

    u: (C, Mg, r), s: (C, r), vt: (C, r, K) with r = min(Mg, K), Mg = M / groups.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    out_channels: int
    groups: int
    kernel_shape: tuple[int, ...]

    @property
    def in_channels(self) -> int:
        return self.s.shape[0]

    @property
    def max_rank(self) -> int:
        return self.s.shape[1]

    @property
    def kernel_size(self) -> int:
        return int(np.prod(self.kernel_shape))

    def channel_group(self) -> np.ndarray:
        """Group index of every input channel."""
        per_group = self.in_channels // self.groups
        return np.arange(self.in_channels) // per_group


def channel_blocks(weight: np.ndarray, groups: int = 1) -> np.ndarray:
    """Stack the per-input-channel blocks W_c, shape (C, M/groups, K)."""
    m, c_per_group = weight.shape[:2]
    k = int(np.prod(weight.shape[2:], dtype=np.int64))
    mg = m // groups
    w = weight.reshape(groups, mg, c_per_group, k)  # (groups, Mg, Cg, K)
    return w.transpose(0, 2, 1, 3).reshape(groups * c_per_group, mg, k)


def _checked_blocks(weight: np.ndarray, groups: int) -> np.ndarray:
    """channel_blocks in float64, after checking the weight is a conv weight for `groups`."""
    if weight.ndim < 3:
        raise ValueError(f"conv weight must have rank >= 3, got shape {weight.shape}")
    m = weight.shape[0]
    if groups < 1 or m % groups:
        raise ValueError(f"output channels {m} not divisible by groups {groups}")
    return channel_blocks(np.asarray(weight, dtype=np.float64), groups)


def spectrum(weight: np.ndarray, groups: int = 1) -> Spectrum:
    """Batched per-channel SVD of a conv weight, computed in float64."""
    u, s, vt = np.linalg.svd(_checked_blocks(weight, groups), full_matrices=False)
    return Spectrum(u=u, s=s, vt=vt, out_channels=weight.shape[0], groups=groups,
                    kernel_shape=tuple(int(d) for d in weight.shape[2:]))


def metric_spectrum(weight: np.ndarray, groups: int, metric: np.ndarray) -> Spectrum:
    """Per-channel SVD in the metric ||X L_c||_F, L_c L_c^T = metric[c] (C, K, K), symmetric positive definite.

    W_c L_c = U S V^T, and vt := V^T L_c^-1, so W_c = U S vt exactly and the rank-g truncation of
    (u, s, vt) minimizes sum_c ||(W_c - Q_c) L_c||_F^2 (Eckart-Young on W_c L_c); s then measures
    that error (weighted_error). metric = I gives `spectrum`."""
    blocks = _checked_blocks(weight, groups)
    c, _, k = blocks.shape
    metric = np.asarray(metric, dtype=np.float64)
    if metric.shape != (c, k, k):
        raise ValueError(f"metric must have shape {(c, k, k)}, got {metric.shape}")
    chol = np.linalg.cholesky(metric)
    u, s, vt = np.linalg.svd(blocks @ chol, full_matrices=False)
    vt = np.swapaxes(np.linalg.solve(np.swapaxes(chol, 1, 2), np.swapaxes(vt, 1, 2)), 1, 2)  # V^T L^-1
    return Spectrum(u=u, s=s, vt=vt, out_channels=weight.shape[0], groups=groups,
                    kernel_shape=tuple(int(d) for d in weight.shape[2:]))


def scores(spec: Spectrum, alpha: np.ndarray | float = 1.0) -> np.ndarray:
    """Value of each rank-1 term: alpha_c * s_ci^2, shape (C, r), non-increasing in i."""
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (spec.in_channels,))
    return a[:, None] * spec.s**2


def weighted_energy(spec: Spectrum, alpha: np.ndarray | float = 1.0) -> float:
    """sum_c alpha_c ||W_c||_F^2."""
    return float(scores(spec, alpha).sum())


def weighted_error(spec: Spectrum, ranks: np.ndarray, alpha: np.ndarray | float = 1.0) -> float:
    """e = sum_c alpha_c sum_{i >= g_c} s_ci^2: the exact weighted squared error at ranks g."""
    sc = scores(spec, alpha)
    dropped = np.arange(spec.max_rank)[None, :] >= np.asarray(ranks)[:, None]
    return float(sc[dropped].sum())


def energy_kept(spec: Spectrum, rank: int) -> float:
    """Fraction of ||W||_F^2 kept when every channel keeps its top `rank` terms."""
    total = float((spec.s**2).sum())
    return float((spec.s[:, :rank] ** 2).sum()) / total if total > 0 else 1.0


def group_width(spec: Spectrum, ranks: np.ndarray) -> int:
    """Intermediate channels per group: the largest group total (groups are padded to it)."""
    totals = np.bincount(spec.channel_group(), weights=np.asarray(ranks), minlength=spec.groups)
    return max(int(totals.max()), 1)


def gdws_cost_per_pixel(spec: Spectrum, ranks: np.ndarray) -> int:
    """MACs (and weight parameters) per output pixel: groups * width * K + M * width.
    For groups = 1 this is the paper's G (K + M)."""
    width = group_width(spec, ranks)
    return spec.groups * width * spec.kernel_size + spec.out_channels * width


def original_cost_per_pixel(spec: Spectrum) -> int:
    """M * (C / groups) * K."""
    return spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel_size


@dataclass(frozen=True)
class GDWSFactors:
    """Weights of the GDWS realization at ranks g (G = sum g_c).

    gather: (G,) input channel of each intermediate channel (c repeated g_c times);
    depthwise: (G, 1, *kernel); pointwise: (M, G / groups, *ones).
    Intermediate channels are ordered by group, then channel, then rank, so a grouped
    pointwise conv sees each group's channels contiguously. Groups are padded to the same
    width with zero kernels when their totals differ.
    """

    gather: np.ndarray
    depthwise: np.ndarray
    pointwise: np.ndarray
    groups: int
    multiplier: bool = False  # every channel has the same width: no Gather, depthwise group = C
    # multiplier form as r true depthwise convs (group = C, C -> C each) on the same input, their
    # outputs concatenated: intermediate channels ordered by term, then channel (t C + c)
    stacked: bool = False

    @property
    def terms(self) -> int:
        """r, the kernels per input channel of the multiplier and stacked forms."""
        return self.depthwise.shape[0] // len(np.unique(self.gather))


def factors(spec: Spectrum, ranks: np.ndarray, dtype: np.dtype = np.float32,
            multiplier: bool = False, stacked: bool = False) -> GDWSFactors:
    """Build the depthwise and pointwise weights for per-channel ranks g.

    multiplier=True pads every channel to max(g) kernels (zero kernels) so the depthwise
    stage is a channel-multiplier conv (group = C) and needs no Gather. stacked=True (implies
    multiplier; ungrouped convs only) orders those kernels by term, so the depthwise stage is r
    true depthwise convs whose outputs are concatenated (`stack`)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.shape != (spec.in_channels,) or ranks.min() < 0 or ranks.max() > spec.max_rank:
        raise ValueError("ranks must be one integer in [0, max_rank] per input channel")
    if stacked:
        if spec.groups != 1:
            raise ValueError("the stacked form needs an ungrouped conv")
        return stack(_multiplier_factors(spec, ranks, dtype))
    if multiplier:
        return _multiplier_factors(spec, ranks, dtype)
    groups, kshape = spec.groups, spec.kernel_shape
    mg = spec.out_channels // groups
    group_of = spec.channel_group()
    width = group_width(spec, ranks)

    gather = np.zeros((groups, width), dtype=np.int64)
    dw = np.zeros((groups, width, spec.kernel_size))
    pw = np.zeros((groups, mg, width))
    for j in range(groups):
        channels = np.flatnonzero(group_of == j)
        gather[j] = channels[0]  # padding slots read any channel of the group with a zero kernel
        pos = 0
        for c in channels:
            g = int(ranks[c])
            gather[j, pos:pos + g] = c
            dw[j, pos:pos + g] = spec.vt[c, :g]
            pw[j, :, pos:pos + g] = spec.u[c, :, :g] * spec.s[c, :g]
            pos += g
    ones = (1,) * len(kshape)
    return GDWSFactors(
        gather=gather.reshape(-1),
        depthwise=dw.reshape(groups * width, 1, *kshape).astype(dtype),
        pointwise=pw.reshape(groups * mg, width, *ones).astype(dtype),
        groups=groups,
    )


def _multiplier_factors(spec: Spectrum, ranks: np.ndarray, dtype: np.dtype) -> GDWSFactors:
    r = max(int(ranks.max()), 1)
    c, mg, groups = spec.in_channels, spec.out_channels // spec.groups, spec.groups
    keep = (np.arange(r)[None, :] < ranks[:, None])  # (C, r) zero beyond each channel's rank
    rr = min(r, spec.max_rank)
    dw = np.zeros((c, r, spec.kernel_size))
    dw[:, :rr] = spec.vt[:, :rr] * keep[:, :rr, None]
    pw_c = np.zeros((c, mg, r))  # per channel: M_g x r
    pw_c[:, :, :rr] = spec.u[:, :, :rr] * (spec.s[:, :rr] * keep[:, :rr])[:, None, :]
    cg = c // groups
    pw = pw_c.reshape(groups, cg, mg, r).transpose(0, 2, 1, 3).reshape(groups * mg, cg * r)
    ones = (1,) * len(spec.kernel_shape)
    return GDWSFactors(gather=np.repeat(np.arange(c), r),
                       depthwise=dw.reshape(c * r, 1, *spec.kernel_shape).astype(dtype),
                       pointwise=pw.reshape(groups * mg, cg * r, *ones).astype(dtype),
                       groups=groups, multiplier=True)


def stack(f: GDWSFactors) -> GDWSFactors:
    """The multiplier form f (intermediate channel c r + t) reordered by term (t C + c): the same
    weight, realized as r depthwise convs whose outputs are concatenated."""
    r = f.terms
    c = f.depthwise.shape[0] // r
    perm = (np.arange(c)[None, :] * r + np.arange(r)[:, None]).reshape(-1)  # new position t C + c <- c r + t
    return GDWSFactors(gather=f.gather[perm], depthwise=f.depthwise[perm], pointwise=f.pointwise[:, perm],
                       groups=f.groups, multiplier=True, stacked=True)


def multiplier_cost_per_pixel(spec: Spectrum, ranks: np.ndarray) -> int:
    """MACs per output pixel of the channel-multiplier form: C r (K + M / groups), r = max g."""
    r = max(int(np.max(ranks)), 1)
    return spec.in_channels * r * (spec.kernel_size + spec.out_channels // spec.groups)


def reconstruct(f: GDWSFactors, in_channels: int) -> np.ndarray:
    """The dense weight Q the factors realize, shape (M, C/groups, *kernel) (for tests and errors)."""
    groups = f.groups
    g_total, _, *kshape = f.depthwise.shape
    width = g_total // groups
    m = f.pointwise.shape[0]
    mg, cg = m // groups, in_channels // groups
    k = int(np.prod(kshape, dtype=np.int64))
    q = np.zeros((groups, mg, cg, k))
    dw = f.depthwise.reshape(groups, width, k).astype(np.float64)
    pw = f.pointwise.reshape(groups, mg, width).astype(np.float64)
    gather = f.gather.reshape(groups, width)
    for j in range(groups):
        for t in range(width):
            q[j, :, gather[j, t] - j * cg] += np.outer(pw[j, :, t], dw[j, t])
    return q.reshape(m, cg, *kshape)
