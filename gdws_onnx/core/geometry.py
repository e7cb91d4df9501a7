"""Convolution geometry in numpy: resolved pads, output sizes, and input patches.

The one place that does conv padding and output-size arithmetic (ONNX conventions: pads are
[b_1..b_n, e_1..e_n]; out = (in + b + e - ((k - 1) d + 1)) // s + 1)."""

from __future__ import annotations

import numpy as np


def resolved_pads(in_spatial, kernel, strides, pads, dilations, auto_pad: str = "NOTSET") -> list[int]:
    """ONNX pads [b_1..b_n, e_1..e_n] with auto_pad applied for this input size."""
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        lo, hi = [], []
        for i in range(n):
            out = -(-in_spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i], 0)
            small, big = total // 2, total - total // 2
            b, e = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
            lo.append(b)
            hi.append(e)
        return lo + hi
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return list(pads) if pads else [0] * (2 * n)


def out_spatial(in_spatial, kernel, strides, pads, dilations) -> tuple[int, ...]:
    """Output spatial dims for resolved pads."""
    n = len(kernel)
    return tuple((in_spatial[i] + pads[i] + pads[i + n] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1
                 for i in range(n))


def patch_means(total: np.ndarray, count: int, kernel, strides, pads, dilations) -> np.ndarray:
    """Mean over samples and output positions of each patch element of a conv's input.

    total: (C, *spatial), the sum over `count` samples of a per-pixel quantity (x, or x^2).
    Returns (C, K), K = prod(kernel) in the row-major order of a conv weight's kernel dims:
    entry (c, k) = mean_{i, p} q_i[c, p * s + k * d - pad], zero where that falls in the padding.
    Exact, because the patch element is a fixed strided slice of the padded input and summing
    over samples commutes with slicing."""
    n = len(kernel)
    total = np.asarray(total, np.float64)
    c, sp = total.shape[0], total.shape[1:]
    if len(sp) != n:
        raise ValueError(f"input has {len(sp)} spatial dims, the kernel {n}")
    padded = np.pad(total, [(0, 0)] + [(pads[i], pads[i + n]) for i in range(n)])
    out = out_spatial(sp, kernel, strides, pads, dilations)
    if min(out) < 1:
        raise ValueError(f"empty conv output for input {sp}")
    res = np.empty((c, int(np.prod(kernel, dtype=np.int64))))
    for k, offs in enumerate(np.ndindex(*kernel)):
        sl = tuple(slice(o * d, o * d + (p - 1) * s + 1, s) for o, d, p, s in zip(offs, dilations, out, strides))
        res[:, k] = padded[(slice(None), *sl)].reshape(c, -1).sum(1)
    return res / (count * int(np.prod(out, dtype=np.int64)))


def patches(v: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """The conv's input patches (N, C, K, P) of v (N, C, *spatial), zero padding included:
    [n, c, k, p] = v_n[c, p * s + k * d - pad], K and P row-major."""
    n = len(kernel)
    x = np.pad(v, [(0, 0), (0, 0)] + [(pads[i], pads[i + n]) for i in range(n)])
    out = out_spatial(v.shape[2:], kernel, strides, pads, dilations)
    cols = []
    for offs in np.ndindex(*kernel):
        sl = tuple(slice(o * d, o * d + (q - 1) * s + 1, s) for o, d, q, s in zip(offs, dilations, out, strides))
        cols.append(x[(slice(None), slice(None), *sl)].reshape(v.shape[0], v.shape[1], -1))
    return np.stack(cols, axis=2)
