"""Fine-tuning through a QDQ graph: its integer weights, trained as float with fake quantization.

ONNX Runtime's static quantization stores each weight (and bias) as an integer initializer read by
a DequantizeLinear: W = (q - zp) * scale. A fine-tune trains a float master copy W, initialised
on the grid, and the forward pass sees it fake-quantized on the same grid,

    fq(W) = (clip(round(W / scale) + zp, lo, hi) - zp) * scale,

with the clipped straight-through estimator as its gradient (1 inside the range, 0 where it
saturates: Bengio et al. 2013, as QAT does). Activation quantizers keep their calibrated scales
and the replica's own clipped straight-through gradient. The scales stay fixed: they are what the
calibration chose and what the graph stores, so writing back is exact (the integers the forward
pass used) and the graph keeps every Q/DQ node and parameter; learning them (LSQ) would change
the graph's scale initializers and the int32 bias scales that depend on them, for little gain in
a short fine-tune. Written back, each master copy becomes the integers of fq(W), in the
initializer's own type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gdws_onnx.eval.gradients.qdq import QRANGES, is_qdq
from gdws_onnx.graph.convs import node_attrs

INTEGER_RANGES = {**QRANGES, onnx.TensorProto.INT32: (-2 ** 31, 2 ** 31 - 1)}


@dataclass(frozen=True)
class QuantizedWeight:
    """A DequantizeLinear of an integer initializer `source`; its float value is named `output`."""

    source: str
    output: str
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    lo: int
    hi: int
    dtype: np.dtype  # the integer type of `source`

    def param(self, p: np.ndarray, rank: int) -> np.ndarray:
        """A per-tensor or per-`axis` parameter, shaped to broadcast against a rank-`rank` weight."""
        p = np.asarray(p)
        if p.size == 1:
            return p.reshape(())
        shape = [1] * rank
        shape[self.axis % rank] = p.size
        return p.reshape(shape)

    def integers(self, w: np.ndarray) -> np.ndarray:
        """clip(round(w / scale) + zp, lo, hi) in the initializer's type (round half to even, as ORT)."""
        s = self.param(self.scale, w.ndim).astype(np.float32)
        z = 0 if self.zero_point is None else self.param(self.zero_point, w.ndim).astype(np.float64)
        q = np.clip(np.rint(w.astype(np.float32) / s).astype(np.float64) + z, self.lo, self.hi)
        return q.astype(self.dtype)

    def fake_quantize(self, torch, w):
        """fq(w) with the clipped straight-through gradient (see the module docstring)."""
        s = torch.tensor(self.param(self.scale, w.dim()).astype(np.float32), dtype=w.dtype)
        z = 0.0 if self.zero_point is None else torch.tensor(
            self.param(self.zero_point, w.dim()).astype(np.float64), dtype=w.dtype)
        low, high = (self.lo - z) * s, (self.hi - z) * s
        clipped = torch.minimum(torch.maximum(w, low), high)
        return clipped + ((torch.round(clipped / s) * s) - clipped).detach()


def quantized_weights(model: onnx.ModelProto) -> dict[str, QuantizedWeight]:
    """Every DequantizeLinear whose input is an integer initializer and whose scale and zero point
    are initializers, by its output name (per-tensor or per-axis; blocked quantization is left out)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if not (is_qdq(n) and n.op_type == "DequantizeLinear") or n.input[0] not in inits:
            continue
        src = inits[n.input[0]]
        a = node_attrs(n)
        if src.data_type not in INTEGER_RANGES or a.get("block_size", 0) \
                or any(i and i not in inits for i in n.input[1:]):
            continue
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
        lo, hi = INTEGER_RANGES[src.data_type]
        out[n.output[0]] = QuantizedWeight(
            source=src.name, output=n.output[0], scale=numpy_helper.to_array(inits[n.input[1]]),
            zero_point=zp, axis=int(a.get("axis", 1)), lo=lo, hi=hi,
            dtype=np.dtype(helper.tensor_dtype_to_np_dtype(src.data_type)))
    return out
