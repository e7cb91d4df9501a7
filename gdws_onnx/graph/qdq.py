"""QDQ placement around convs, read off the graph (no ONNX Runtime): which Conv nodes of a
QDQ-quantized model are wrapped so that ONNX Runtime's QDQ transformer can fuse them into an
int8 kernel (QLinearConv).

The conditions mirror ORT's `ConvNodeGroupSelector` (onnxruntime/core/optimizer/qdq_transformer/
selectors_actions/qdq_selectors.cc): a DequantizeLinear on every input the Conv has (data, weight,
and the bias if any, the bias as int32), a QuantizeLinear as the one consumer of its output (or of
a Relu/Clip that is its one consumer: ORT drops it as made redundant by the Q), the output not a
graph output, and the data and output types equal (int8 data needs int8 weights). The check reads
the graph as written: ORT may first move a Q/DQ across a data-movement op (QDQ propagation through
MaxPool, Transpose, Reshape), or turn an int8 pair into uint8, or not (the x86 CPU EP needs uint8
data for QLinearConv): whether ORT really runs an int8 kernel is the runtime's to say
(`runtime.kernels.conv_kernels`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx
from onnx import TensorProto

from gdws_onnx.graph.convs import node_label
from gdws_onnx.graph.pattern import DEPTHWISE, POINTWISE, is_gdws_node, layer_of

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
INT8_TYPES = (TensorProto.INT8, TensorProto.UINT8)
REDUNDANT_ACTIVATIONS = ("Relu", "Clip")  # between a Conv and its Q: dropped by ORT's QDQ fusion


@dataclass
class ConvQDQ:
    """One Conv of a model and the QDQ nodes around it."""

    name: str  # node_label of the Conv
    layer: str  # the original conv it belongs to (pattern.layer_of)
    role: str | None  # "dw" or "pw" for a GDWS conv, None for any other conv
    input_dq: bool  # its data input comes from a DequantizeLinear
    weight_dq: bool  # its weight comes from a DequantizeLinear of a constant
    output_q: bool  # its output (or that of a redundant Relu/Clip after it) goes to one QuantizeLinear only
    missing: list[str] = field(default_factory=list)  # what keeps ORT from fusing it ([] when wrapped)
    quantized_weight: str = ""  # the int8 weight initializer its weight DequantizeLinear reads

    @property
    def wrapped(self) -> bool:
        """True when the Conv has everything ORT's QDQ conv selector asks for."""
        return not self.missing


@dataclass
class Int8Coverage:
    """Every Conv of a model, in graph order, and whether it is QDQ-wrapped."""

    convs: list[ConvQDQ]

    @property
    def wrapped(self) -> list[ConvQDQ]:
        return [c for c in self.convs if c.wrapped]

    @property
    def gdws(self) -> list[ConvQDQ]:
        """The convs of GDWS subgraphs (depthwise and pointwise)."""
        return [c for c in self.convs if c.role is not None]

    def to_dict(self) -> dict:
        return {"convs": len(self.convs), "wrapped": len(self.wrapped),
                "gdws_convs": len(self.gdws), "gdws_wrapped": sum(c.wrapped for c in self.gdws),
                "not_wrapped": [{"name": c.name, "missing": c.missing} for c in self.convs if not c.wrapped],
                "layers": [asdict(c) for c in self.convs]}


@dataclass
class GraphIndex:
    """What the QDQ checks look up in a graph: producers, consumers, value types, constants, outputs."""

    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    types: dict[str, int]  # element type of initializers and declared values
    constants: set[str]
    outputs: set[str]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        types = {vi.name: vi.type.tensor_type.elem_type for vi in (*graph.input, *graph.value_info, *graph.output)
                 if vi.type.HasField("tensor_type")}
        types.update({t.name: t.data_type for t in graph.initializer})
        constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                           for o in n.output}
        return cls({o: n for n in graph.node for o in n.output}, consumers, types, constants,
                   {o.name for o in graph.output})

    def dequantized(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing `name`, if that is what produces it."""
        p = self.producer.get(name)
        return p if p is not None and p.op_type == DEQUANTIZE else None


def _gdws_role(node: onnx.NodeProto) -> str | None:
    for role in (DEPTHWISE, POINTWISE):
        if is_gdws_node(node, role):
            return role
    return None


def _output_quantizer(g: GraphIndex, conv: onnx.NodeProto) -> onnx.NodeProto | None:
    """The QuantizeLinear that is the one consumer of the conv's output, or of a Relu/Clip that is
    its one consumer; None when there is none or the output (or the activation's) is a graph output."""
    out = conv.output[0]
    if out in g.outputs:
        return None
    after = g.consumers.get(out, [])
    if len(after) == 1 and after[0].op_type in REDUNDANT_ACTIVATIONS:
        if after[0].output[0] in g.outputs:
            return None
        after = g.consumers.get(after[0].output[0], [])
    return after[0] if len(after) == 1 and after[0].op_type == QUANTIZE else None


def conv_qdq(g: GraphIndex, conv: onnx.NodeProto) -> ConvQDQ:
    """The QDQ nodes around one Conv, and what ORT's conv selector would miss."""
    missing = []
    data_dq = g.dequantized(conv.input[0])
    weight_dq = g.dequantized(conv.input[1]) if len(conv.input) > 1 else None
    if weight_dq is not None and weight_dq.input[0] not in g.constants:
        weight_dq = None
    if data_dq is None:
        missing.append("no DequantizeLinear on its data input")
    if weight_dq is None:
        missing.append("no DequantizeLinear of a constant on its weight")
    if len(conv.input) > 2 and conv.input[2]:
        bias_dq = g.dequantized(conv.input[2])
        if bias_dq is None or g.types.get(bias_dq.input[0]) != TensorProto.INT32:
            missing.append("its bias is not an int32 DequantizeLinear")
    q = _output_quantizer(g, conv)
    if q is None:
        missing.append("its output does not go to one QuantizeLinear only")
    if data_dq is not None and q is not None:
        dt_in, dt_out = g.types.get(data_dq.input[0]), g.types.get(q.output[0])
        if dt_in not in INT8_TYPES or dt_in != dt_out:
            missing.append("its data and output are not the same 8-bit type")
        elif dt_in == TensorProto.INT8 and weight_dq is not None and g.types.get(weight_dq.input[0]) != TensorProto.INT8:
            missing.append("int8 data needs int8 weights")
    name = node_label(conv)
    return ConvQDQ(name=name, layer=layer_of(name), role=_gdws_role(conv), input_dq=data_dq is not None,
                   weight_dq=weight_dq is not None, output_q=q is not None, missing=missing,
                   quantized_weight=weight_dq.input[0] if weight_dq is not None else "")


def int8_coverage(model: onnx.ModelProto) -> Int8Coverage:
    """Each Conv of the top-level graph, in graph order, with its QDQ wrapping (`conv_qdq`)."""
    graph = _typed(model)
    g = GraphIndex.of(graph)
    return Int8Coverage([conv_qdq(g, n) for n in graph.node if n.op_type == "Conv"])


def _typed(model: onnx.ModelProto) -> onnx.GraphProto:
    """The graph with value types inferred where onnx can (the Q/DQ output types), else as it is."""
    try:
        return onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
        return model.graph
