"""QDQ (QuantizeLinear/DequantizeLinear) models as the gradient sources see them (no torch).

ONNX Runtime's static quantization (QDQ format) wraps every float op between DequantizeLinear
and QuantizeLinear. Q/DQ of constants (int8 weights, int32 biases) are constants; activation
pairs have only straight-through (BPDA) gradients. `activation_quantizers` finds the latter;
`DequantizedSurrogate` is the graph pass that builds the float network whose gradient the
straight-through estimator approximates (the BPDA gate differentiates it on ONNX Runtime).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.convs import node_attrs
from gdws_onnx.graph.passes import PassResult

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Saturation bounds of QuantizeLinear's integer output types, and every data type a Q/DQ
# parameter may have (others, such as INT4 and float8, are refused)
QRANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
           TensorProto.UINT16: (0, 65535)}
QDQ_TYPES = (*QRANGES, TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def is_qdq(node: onnx.NodeProto) -> bool:
    """A QuantizeLinear or DequantizeLinear of the default domain."""
    return node.op_type in QDQ_OPS and node.domain in ("", "ai.onnx")


def const_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs (attribute `value`) by name."""
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            a = node_attrs(n)
            if "value" in a:
                vals[n.output[0]] = numpy_helper.to_array(a["value"])
    return vals


def activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """QuantizeLinear nodes whose input is not a constant: the fake-quantized activations of a
    QDQ model, through which only straight-through (BPDA) gradients exist. (Q/DQ of constants,
    such as int8 weights, fold to constants: the same rule as `TorchReplica`.)"""
    consts = set(const_values(model))
    out = []
    for n in model.graph.node:
        if is_qdq(n):
            if all(not i or i in consts for i in n.input):
                consts.update(n.output)
            elif n.op_type == "QuantizeLinear":
                out.append(n)
    return out


def _np_qrange(zp: np.ndarray | None, attrs: dict) -> tuple[int, int]:
    if zp is None:
        return QRANGES.get(attrs.get("output_dtype", 0) or TensorProto.UINT8, (0, 255))
    return {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int16): (-32768, 32767),
            np.dtype(np.uint16): (0, 65535), np.dtype(np.int32): (-2 ** 31, 2 ** 31 - 1)}[np.dtype(zp.dtype)]


def _np_param(p: np.ndarray, rank: int, axis: int) -> np.ndarray:
    p = np.asarray(p)
    if p.size == 1:
        return p.reshape(())
    shape = [1] * rank
    shape[axis % rank] = p.size
    return p.reshape(shape)


def _evaluate_constant(node: onnx.NodeProto, ins: list, a: dict) -> np.ndarray:
    """QuantizeLinear or DequantizeLinear of constant inputs, in numpy as ONNX Runtime computes it."""
    x, s = ins[0], ins[1].astype(np.float32)
    zp = ins[2] if len(ins) > 2 else None
    if node.op_type == "DequantizeLinear":
        d = x.astype(np.int64) if not np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
        if zp is not None:
            d = d - _np_param(zp, x.ndim, a.get("axis", 1)).astype(d.dtype)
        return d.astype(np.float32) * _np_param(s, x.ndim, a.get("axis", 1))
    lo, hi = _np_qrange(zp, a)
    z = 0 if zp is None else _np_param(zp, x.ndim, a.get("axis", 1)).astype(np.float32)
    out = np.clip(np.rint(x.astype(np.float32) / _np_param(s, x.ndim, a.get("axis", 1))) + z, lo, hi)
    return out.astype(zp.dtype if zp is not None else np.uint8)


@dataclass
class SurrogateReport:
    """What `DequantizedSurrogate` did: constant Q/DQ nodes evaluated, activation quantizers clamped."""

    constants_evaluated: int = 0
    activations_clamped: int = 0


class DequantizedSurrogate:
    """The float network a QDQ model approximates, as the BPDA gradient sees it (a graph pass).

    Constant QuantizeLinear/DequantizeLinear (weights, biases) are evaluated into float
    initializers; each activation QuantizeLinear -> DequantizeLinear pair becomes
    min(max(x, (lo - zp) s), (hi - zp) s): the rounding dropped, the saturation kept (it stands
    for the Relu the quantizer removed). Its exact gradient is what the clipped straight-through
    estimator of `TorchReplica` computes, up to evaluating it at un-rounded activations.
    GDWSError when a Q/DQ node cannot be made float (blocked quantization, a non-constant
    scale or zero point, a DequantizeLinear of neither a constant nor a QuantizeLinear, an op
    reading an integer tensor). The model is edited in place; a model without Q/DQ nodes is
    returned unchanged (modified False)."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        if not any(is_qdq(n) for n in g.node):
            return PassResult(model, False, SurrogateReport())
        report = SurrogateReport()
        consts = const_values(model)
        inferred = None
        new_nodes, new_inits = [], []
        producers_of_q: dict[str, str] = {}  # QuantizeLinear output -> clamped float tensor
        for n in g.node:
            if not is_qdq(n):
                new_nodes.append(n)
                continue
            a = node_attrs(n)
            if a.get("block_size", 0):
                raise GDWSError(f"{n.op_type} with block_size is not supported")
            ins = [consts.get(i) if i else None for i in n.input]
            if all(v is not None for i, v in zip(n.input, ins) if i):  # constant: evaluate
                out = _evaluate_constant(n, ins, a)
                consts[n.output[0]] = out
                new_inits.append(numpy_helper.from_array(np.asarray(out), n.output[0]))
                report.constants_evaluated += 1
                continue
            if n.op_type == "DequantizeLinear":
                if n.input[0] not in producers_of_q:
                    raise GDWSError(f"DequantizeLinear '{n.name or n.output[0]}' reads neither a constant nor a "
                                    "QuantizeLinear output; no float surrogate")
                new_nodes.append(helper.make_node("Identity", [producers_of_q[n.input[0]]], [n.output[0]],
                                                  name=(n.name or n.output[0]) + "/surrogate"))
                continue
            # activation QuantizeLinear: keep its saturation as a clamp in float
            s, zp = ins[1], ins[2] if len(ins) > 2 else None
            if s is None or (len(n.input) > 2 and n.input[2] and zp is None):
                raise GDWSError(f"QuantizeLinear '{n.name or n.output[0]}' has a non-constant scale or zero point")
            rank = 1
            if np.asarray(s).size > 1:
                if inferred is None:  # the graph is still the input's: it is replaced below
                    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
                    inferred.update({v.name: v for v in g.input})
                vi = inferred.get(n.input[0])
                if vi is None or not vi.type.tensor_type.HasField("shape"):
                    raise GDWSError(f"QuantizeLinear '{n.name or n.output[0]}': per-axis scale on a tensor of "
                                    "unknown rank")
                rank = len(vi.type.tensor_type.shape.dim)
            base = n.output[0] + "_surrogate"
            new_inits += _clamp_bounds(s, zp, a, rank, base)
            new_nodes += [helper.make_node("Max", [n.input[0], base + "_lo"], [base + "_max"], name=base + "/max"),
                          helper.make_node("Min", [base + "_max", base + "_hi"], [base], name=base + "/min")]
            producers_of_q[n.output[0]] = base
            report.activations_clamped += 1
        for n in new_nodes:
            if any(i in producers_of_q for i in n.input):
                raise GDWSError(f"{n.op_type} '{n.name}' reads a quantized (integer) tensor; no float surrogate")
        used = {i for n in new_nodes for i in n.input} | {o.name for o in g.output}
        keep = [t for t in g.initializer if t.name in used]
        del g.node[:]
        g.node.extend(new_nodes)
        del g.initializer[:]
        g.initializer.extend(keep + [t for t in new_inits if t.name in used])
        del g.value_info[:]
        return PassResult(model, True, report)


def _clamp_bounds(s: np.ndarray, zp: np.ndarray | None, a: dict, rank: int, base: str) -> list[onnx.TensorProto]:
    """Initializers `<base>_lo`, `<base>_hi`: the float values at which the quantizer saturates,
    (lo - zp) s and (hi - zp) s, broadcast along `axis` of a rank-`rank` tensor."""
    lo, hi = _np_qrange(zp, a)
    s = np.asarray(s, np.float32)
    z = np.zeros_like(s) if zp is None else np.asarray(zp).astype(np.float32)
    axis = a.get("axis", 1)
    lo_f = (_np_param((lo - z.astype(np.float64)) * s, rank, axis)).astype(np.float32)
    hi_f = (_np_param((hi - z.astype(np.float64)) * s, rank, axis)).astype(np.float32)
    return [numpy_helper.from_array(lo_f, base + "_lo"), numpy_helper.from_array(hi_f, base + "_hi")]


def dequantized_surrogate(model: onnx.ModelProto) -> onnx.ModelProto:
    """`DequantizedSurrogate` applied to a copy of `model` (the input is left as it is)."""
    return DequantizedSurrogate().call(copy.deepcopy(model)).model
