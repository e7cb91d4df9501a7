"""Statistics for paired classifier comparisons (pure numpy/scipy; knows nothing of ONNX)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Proportion:
    """k successes out of n with a Wilson score interval at `confidence`."""

    k: int
    n: int
    value: float
    low: float
    high: float
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (no continuity correction).

    n = 0 gives (0, 1). Bounds are clipped to [0, 1]."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    from scipy.special import ndtri  # the normal quantile; scipy.stats costs 0.5 s to import

    z = float(ndtri(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(mask: np.ndarray, confidence: float = 0.95) -> Proportion:
    """Fraction of True entries of a boolean vector, with its Wilson interval."""
    mask = np.asarray(mask, bool).ravel()
    k, n = int(mask.sum()), int(mask.size)
    lo, hi = wilson_interval(k, n, confidence)
    return Proportion(k, n, k / n if n else float("nan"), lo, hi, confidence)


@dataclass
class McNemar:
    """Exact McNemar test of paired correctness a (first) vs b (second).

    b_only: a wrong, b right; a_only: a right, b wrong; p_value: two-sided exact binomial
    test of a_only vs b_only discordant pairs (1.0 when there are none)."""

    a_only: int
    b_only: int
    discordant: int
    p_value: float
    difference: float  # accuracy(a) - accuracy(b)

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Paired exact McNemar test on two boolean correctness vectors of equal length."""
    a = np.asarray(correct_a, bool).ravel()
    b = np.asarray(correct_b, bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} vs {b.size}")
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    disc = a_only + b_only
    p = 1.0
    if disc:
        from scipy import stats  # 0.5 s to import: only when a p-value is needed

        p = float(stats.binomtest(a_only, disc, 0.5, alternative="two-sided").pvalue)
    diff = float(a.mean() - b.mean()) if a.size else 0.0
    return McNemar(a_only, b_only, disc, min(p, 1.0), diff)


@dataclass
class ErrorStats:
    """How far output `new` is from `ref` (per sample rows for cosine)."""

    max_abs: float
    mean_abs: float
    relative: float  # ||new - ref||_2 / ||ref||_2 over everything
    cosine_min: float  # smallest per-sample cosine similarity
    cosine_mean: float

    def to_dict(self) -> dict:
        return asdict(self)


def error_stats(ref: np.ndarray, new: np.ndarray) -> ErrorStats:
    """Absolute, relative and per-sample cosine statistics of new vs ref (first axis = sample)."""
    r = np.asarray(ref, np.float64)
    o = np.asarray(new, np.float64)
    if r.shape != o.shape:
        raise ValueError(f"shapes differ: {r.shape} vs {o.shape}")
    d = np.abs(o - r)
    nr = float(np.linalg.norm(r))
    rel = float(np.linalg.norm(o - r)) / nr if nr > 0 else float(d.max(initial=0.0))
    r2 = r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1)
    o2 = o.reshape(r2.shape)
    num = np.sum(r2 * o2, axis=1)
    den = np.linalg.norm(r2, axis=1) * np.linalg.norm(o2, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return ErrorStats(float(d.max(initial=0.0)), float(d.mean()) if d.size else 0.0, rel,
                      float(cos.min(initial=1.0)), float(cos.mean()) if cos.size else 1.0)
