"""Tucker-2 of a conv weight (HOSVD on the two channel modes, Kim et al. 2016), numpy only.

A conv W (M, C, *k) becomes a 1x1 conv C -> r1, a k conv r1 -> r2 (the core) and a 1x1 conv
r2 -> M. U_out (M x M') and U_in (C x C') are the left singular vectors of W's mode-M and
mode-C unfoldings; the core is G = W x_M U_out^T x_C U_in^T. Both bases are orthonormal, so the
truncation to (r2, r1) keeps exactly ||G[:r2, :r1]||^2 of ||W||^2: every rank pair's relative
error comes from one cumulative sum, and the cheapest pair within an error is a table look-up.
At full rank (r1 = C', r2 = M') it is exact. Its ONNX realization is `graph/tucker.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TuckerSpectrum:
    """The HOSVD of one weight (M, C, *k), in float64."""

    u_out: np.ndarray  # (M, M')
    u_in: np.ndarray  # (C, C')
    core: np.ndarray  # (M', C', *k)
    kept: np.ndarray  # (M', C'): kept[r2 - 1, r1 - 1] = ||G[:r2, :r1]||^2 / ||W||^2
    weight_shape: tuple[int, ...]

    @property
    def max_ranks(self) -> tuple[int, int]:
        """(r1, r2) at which the decomposition is exact: (C', M')."""
        return int(self.u_in.shape[1]), int(self.u_out.shape[1])


def tucker_spectrum(weight: np.ndarray) -> TuckerSpectrum:
    """HOSVD of a conv weight (M, C, *k) over its output and input channel modes."""
    w = np.asarray(weight, np.float64)
    m, c = w.shape[:2]
    u_out = np.linalg.svd(w.reshape(m, -1), full_matrices=False)[0]
    u_in = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(c, -1), full_matrices=False)[0]
    core = np.tensordot(u_out.T, w, axes=([1], [0]))  # (M', C, *k)
    core = np.moveaxis(np.tensordot(u_in.T, core, axes=([1], [1])), 0, 1)  # (M', C', *k)
    total = float((w**2).sum())
    energy = (core**2).reshape(core.shape[0], core.shape[1], -1).sum(axis=2)
    kept = np.cumsum(np.cumsum(energy, axis=0), axis=1) / total if total > 0 else np.ones_like(energy)
    return TuckerSpectrum(u_out, u_in, core, kept, tuple(int(d) for d in w.shape))


def relative_error(spec: TuckerSpectrum, r1: int, r2: int) -> float:
    """||W - W_(r1, r2)||^2 / ||W||^2 = 1 - ||G[:r2, :r1]||^2 / ||W||^2."""
    return max(0.0, 1.0 - float(spec.kept[r2 - 1, r1 - 1]))


def tucker_macs(weight_shape: tuple[int, ...], r1: int, r2: int, in_pixels: int, out_pixels: int) -> int:
    """MACs per sample: C r1 at the input's size, then (r1 r2 prod(k) + r2 M) at the output's."""
    m, c, *k = weight_shape
    return int(in_pixels * c * r1 + out_pixels * (r1 * r2 * int(np.prod(k)) + r2 * m))


def ranks_at_error(spec: TuckerSpectrum, eps: float, in_pixels: int, out_pixels: int) -> tuple[int, int]:
    """(r1, r2): the pair with the fewest MACs (`tucker_macs`) whose relative error is <= eps."""
    ok = spec.kept >= 1.0 - eps - 1e-12
    r2s, r1s = np.nonzero(ok)
    r1s, r2s = r1s + 1, r2s + 1
    m, c, *k = spec.weight_shape
    macs = in_pixels * c * r1s + out_pixels * (r1s * r2s * int(np.prod(k)) + r2s * m)
    i = int(np.lexsort((r1s + r2s, macs))[0])  # fewest MACs, then the smaller ranks
    return int(r1s[i]), int(r2s[i])


def tucker_factors(spec: TuckerSpectrum, r1: int, r2: int, dtype: np.dtype = np.float32
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three conv weights: first (r1, C, 1...) = U_in[:, :r1]^T, core (r2, r1, *k) = G[:r2, :r1],
    last (M, r2, 1...) = U_out[:, :r2]; last o core o first = W_(r1, r2)."""
    m, c, *k = spec.weight_shape
    ones = [1] * len(k)
    first = spec.u_in[:, :r1].T.reshape(r1, c, *ones)
    core = spec.core[:r2, :r1]
    last = spec.u_out[:, :r2].reshape(m, r2, *ones)
    return first.astype(dtype), np.ascontiguousarray(core).astype(dtype), last.astype(dtype)


def tucker_reconstruct(first: np.ndarray, core: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The dense weight (M, C, *k) the three convs realize."""
    f = first.reshape(first.shape[0], first.shape[1]).astype(np.float64)  # (r1, C)
    l_ = last.reshape(last.shape[0], last.shape[1]).astype(np.float64)  # (M, r2)
    g = core.astype(np.float64)
    return np.tensordot(l_, np.moveaxis(np.tensordot(f.T, g, axes=([1], [1])), 0, 1), axes=([1], [0]))
