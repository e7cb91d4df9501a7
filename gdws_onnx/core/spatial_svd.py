"""Spatial SVD of a conv weight (the Qualcomm AIMET scheme), numpy only: a k_h x k_w conv as a
vertical (k_h x 1, I -> r) conv followed by a horizontal (1 x k_w, r -> O) one.

With W of shape (O, I, kh, kw), M[(i,y),(o,x)] = W[o,i,y,x] is an (I kh) x (O kw) matrix; the
rank-r truncated SVD M ~= U_r S_r V_r^T gives A = U_r S_r^1/2 and B = S_r^1/2 V_r^T (Eckart-Young
optimal, exact at r = min(I kh, O kw)). Its ONNX realization is `graph/spatial_svd.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpatialSpectrum:
    """SVD of the spatial-SVD matrix M (I kh x O kw) of one weight (O, I, kh, kw), in float64."""

    u: np.ndarray  # (I kh, r_max)
    s: np.ndarray  # (r_max,)
    vt: np.ndarray  # (r_max, O kw)
    weight_shape: tuple[int, int, int, int]

    @property
    def max_rank(self) -> int:
        return int(self.s.size)


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """M of shape (I kh, O kw) with M[(i,y),(o,x)] = W[o,i,y,x]."""
    o, i, kh, kw = weight.shape
    return np.asarray(weight).transpose(1, 2, 0, 3).reshape(i * kh, o * kw)


def spatial_spectrum(weight: np.ndarray) -> SpatialSpectrum:
    """Thin SVD of `spatial_matrix(weight)` in float64; r_max = min(I kh, O kw)."""
    if weight.ndim != 4:
        raise ValueError(f"spatial SVD needs a 2-D conv weight (O, I, kh, kw), got shape {weight.shape}")
    u, s, vt = np.linalg.svd(spatial_matrix(weight.astype(np.float64)), full_matrices=False)
    return SpatialSpectrum(u=u, s=s, vt=vt, weight_shape=tuple(int(d) for d in weight.shape))


def spatial_singular_values(weight: np.ndarray) -> np.ndarray:
    """The singular values of `spatial_matrix(weight)` in float64, largest first (no vectors)."""
    if weight.ndim != 4:
        raise ValueError(f"spatial SVD needs a 2-D conv weight (O, I, kh, kw), got shape {weight.shape}")
    return np.linalg.svd(spatial_matrix(weight.astype(np.float64)), compute_uv=False)


def rank_at_error(singular_values: np.ndarray, eps: float) -> int:
    """The smallest rank r >= 1 with sum_{j >= r} sigma_j^2 <= eps ||W||_F^2 (Eckart-Young)."""
    energy = np.asarray(singular_values, np.float64) ** 2
    total = float(energy.sum())
    tail = total - np.cumsum(energy)  # tail[r - 1]: the error at rank r
    return int(np.argmax(tail <= eps * total + 1e-12 * total)) + 1 if total > 0 else 1


def round_rank(rank: int, multiple: int, max_rank: int) -> int:
    """`rank` rounded up to a multiple of `multiple`, at most `max_rank` (the rank at which the
    factorization is exact). Channel counts that are multiples of ONNX Runtime's NCHWc block
    (8 with AVX2, 16 with AVX-512) keep a conv pair in the blocked layout, which at batch 1
    outweighs the extra MACs (docs/recovery.md, "Channel blocks")."""
    return min(-(-rank // multiple) * multiple, max_rank)


def block_energy(energy: np.ndarray, multiple: int) -> np.ndarray:
    """Per-rank scores summed over consecutive blocks of `multiple` ranks (the last block
    partial): allocating whole blocks yields ranks that are multiples of it (or the full rank)."""
    pad = -len(energy) % multiple
    return np.concatenate([energy, np.zeros(pad, energy.dtype)]).reshape(-1, multiple).sum(axis=1)


def relative_energy(spec: SpatialSpectrum) -> np.ndarray:
    """sigma_j^2 / ||W||_F^2 per rank j (non-increasing, sums to 1)."""
    total = float((spec.s**2).sum())
    return spec.s**2 / total if total > 0 else np.zeros_like(spec.s)


def relative_error(spec: SpatialSpectrum, rank: int) -> float:
    """||W - W_r||_F^2 / ||W||_F^2 = sum_{j >= r} sigma_j^2 / sum_j sigma_j^2."""
    return float(relative_energy(spec)[rank:].sum())


def spatial_factors(spec: SpatialSpectrum, rank: int, dtype: np.dtype = np.float32
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Weights (A, B) of the two convs at rank r: A (r, I, kh, 1) = (U_r S_r^1/2)^T reshaped,
    B (O, r, 1, kw) from S_r^1/2 V_r^T; B conv A == W_r, the best rank-r approximation of W."""
    o, i, kh, kw = spec.weight_shape
    if not 1 <= rank <= spec.max_rank:
        raise ValueError(f"rank must be in [1, {spec.max_rank}], got {rank}")
    root = np.sqrt(spec.s[:rank])
    a = (spec.u[:, :rank] * root).T.reshape(rank, i, kh, 1)
    b = (root[:, None] * spec.vt[:rank]).reshape(rank, o, kw).transpose(1, 0, 2).reshape(o, rank, 1, kw)
    return a.astype(dtype), b.astype(dtype)


def spatial_reconstruct(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The dense weight (O, I, kh, kw) that conv A then conv B realize: W[o,i,y,x] = sum_r A[r,i,y] B[o,r,x]."""
    return np.einsum("riy,orx->oiyx", a[..., 0].astype(np.float64), b[:, :, 0].astype(np.float64))


@dataclass(frozen=True)
class SpatialGeometry:
    """Sizes of one 2-D conv once its pads are explicit: input (H, W), output (H', W')."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int
    pads: tuple[int, int, int, int]  # top, left, bottom, right


def ssvd_macs_per_rank(weight_shape: tuple[int, ...], geo: SpatialGeometry) -> int:
    """MACs per sample of one rank: A runs at H' x W (vertical stride only, no horizontal pads),
    B at H' x W': I kh H' W + O kw H' W'."""
    o, i, kh, kw = weight_shape
    return i * kh * geo.out_h * geo.in_w + o * kw * geo.out_h * geo.out_w


def dense_conv_macs(weight_shape: tuple[int, ...], geo: SpatialGeometry) -> int:
    """MACs per sample of the original conv: O I kh kw H' W'."""
    o, i, kh, kw = weight_shape
    return o * i * kh * kw * geo.out_h * geo.out_w
