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

from gdws_onnx.eval.gradients import torch_ops
from gdws_onnx.eval.gradients.qdq import is_qdq
from gdws_onnx.graph.convs import node_attrs


@dataclass(frozen=True)
class QuantizedWeight:
    """A DequantizeLinear of an integer initializer `source`; its float value is named `output`.
    The zero point is in the source's type (zeros when the node has none), which sets the range."""

    source: str
    output: str
    scale: np.ndarray
    zero_point: np.ndarray
    attrs: dict  # the node's attributes (axis)

    @property
    def dtype(self) -> np.dtype:
        """The integer type of `source`."""
        return self.zero_point.dtype

    def _params(self, torch) -> tuple:
        return torch.from_numpy(self.scale.copy()), torch.from_numpy(self.zero_point.copy())

    def fake_quantize(self, torch, w):
        """fq(w): QuantizeLinear then DequantizeLinear as the replica runs them (`torch_ops`), with
        QuantizeLinear's clipped straight-through gradient (see the module docstring)."""
        s, z = self._params(torch)
        return torch_ops.dequantize(torch, [torch_ops.quantize(torch, [w, s, z], self.attrs), s, z], self.attrs)

    def integers(self, w: np.ndarray) -> np.ndarray:
        """The integers fq(w) dequantizes, in the initializer's type: what the forward pass used."""
        import torch

        s, z = self._params(torch)
        with torch.no_grad():
            q = torch_ops.quantize(torch, [torch.from_numpy(np.asarray(w, np.float32).copy()), s, z], self.attrs)
        return q.numpy().astype(self.dtype)


def quantized_weights(model: onnx.ModelProto) -> dict[str, QuantizedWeight]:
    """Every DequantizeLinear whose input is an integer initializer and whose scale and zero point
    are initializers, by its output name (per-tensor or per-axis; blocked quantization is left out)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if not (is_qdq(n) and n.op_type == "DequantizeLinear") or n.input[0] not in inits:
            continue
        src = inits[n.input[0]]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(src.data_type))
        a = node_attrs(n)
        if not np.issubdtype(dtype, np.integer) or a.get("block_size", 0) \
                or any(i and i not in inits for i in n.input[1:]):
            continue
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else np.zeros((), dtype)
        out[n.output[0]] = QuantizedWeight(source=src.name, output=n.output[0],
                                           scale=numpy_helper.to_array(inits[n.input[1]]).astype(np.float32),
                                           zero_point=zp, attrs=a)
    return out
