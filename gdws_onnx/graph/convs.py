"""Find the Conv nodes of a model, their constant weights, attributes, shapes and MACs (no runtime)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from gdws_onnx.core import geometry
from gdws_onnx.errors import GDWSError

NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "Multinomial", "Bernoulli"}


@dataclass
class ConvSite:
    """One Conv node of the top-level graph and everything the rewrite needs to know of it."""

    index: int  # position in graph.node
    node: onnx.NodeProto
    name: str  # node name, or its output name when the node is unnamed
    weight: np.ndarray | None  # None when the weight is computed at run time
    weight_source: str  # "initializer", "Constant", "folded subgraph" or why it is not constant
    weight_producers: set[str] = field(default_factory=set)  # outputs of its weight subgraph's nodes
    group: int = 1
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    out_spatial: tuple[int, ...] | None = None  # output spatial dims (per sample), if known
    in_spatial: tuple[int, ...] | None = None  # input spatial dims, if known
    shape_note: str = ""  # why out_spatial is unknown (empty when it is known)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight.shape[2:]) if self.weight is not None else ()

    @property
    def kernel_size(self) -> int:
        return int(np.prod(self.kernel_shape, dtype=np.int64))

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.group

    @property
    def pixels(self) -> int | None:
        return int(np.prod(self.out_spatial, dtype=np.int64)) if self.out_spatial else None

    @property
    def macs_per_pixel(self) -> int:
        return self.out_channels * (self.in_channels // self.group) * self.kernel_size

    @property
    def params(self) -> int:
        bias = self.out_channels if len(self.node.input) > 2 and self.node.input[2] else 0
        return int(self.weight.size) + bias


def node_label(node: onnx.NodeProto) -> str:
    """The name a node is known by in reports and option files."""
    return node.name or (node.output[0] if node.output else node.op_type)


def node_attrs(node: onnx.NodeProto) -> dict:
    """Attribute name -> Python value."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class ConstantResolver:
    """Evaluates tensors that depend only on initializers and Constant nodes."""

    def __init__(self, model: onnx.ModelProto, base_dir: str = ""):
        g = model.graph
        self.model = model
        self.base_dir = base_dir
        self.initializers = {t.name: t for t in g.initializer}
        self.producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}

    def ancestors(self, name: str) -> tuple[list[int] | None, str]:
        """Indices of the nodes computing `name`, or (None, reason) if it is not constant."""
        nodes, stack, seen = set(), [name], set()
        g = self.model.graph
        while stack:
            t = stack.pop()
            if t in seen or t in self.initializers:
                continue
            seen.add(t)
            if t not in self.producer:
                return None, f"weight '{name}' is computed at run time (depends on input '{t}')"
            i = self.producer[t]
            n = g.node[i]
            if n.op_type in NONDETERMINISTIC_OPS or n.domain not in ("", "ai.onnx") or any(
                    a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for a in n.attribute):
                return None, f"weight '{name}' is produced by {n.op_type}, which is not folded"
            nodes.add(i)
            stack.extend(x for x in n.input if x)
        return sorted(nodes), ""

    def value(self, name: str) -> tuple[np.ndarray | None, list[int], str]:
        """(array, producing node indices, source description) for a tensor name."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name], self.base_dir), [], "initializer"
        nodes, reason = self.ancestors(name)
        if nodes is None:
            return None, [], reason
        g = self.model.graph
        first = g.node[nodes[0]]
        if len(nodes) == 1 and first.op_type == "Constant" and first.attribute[0].name == "value":
            return numpy_helper.to_array(first.attribute[0].t, self.base_dir), nodes, "Constant"
        try:
            return self._evaluate(name, nodes), nodes, "folded subgraph"
        except Exception as e:  # noqa: BLE001 - the reference evaluator lacks some ops/versions (e.g. DequantizeLinear-13)
            ops = sorted({g.node[i].op_type for i in nodes})
            return None, [], f"weight '{name}' is computed by {'/'.join(ops)}, which could not be folded ({type(e).__name__})"

    def _evaluate(self, name: str, nodes: list[int]) -> np.ndarray:
        from onnx.reference import ReferenceEvaluator

        g = self.model.graph
        sub_nodes = [g.node[i] for i in nodes]
        needed = {x for n in sub_nodes for x in n.input if x in self.initializers}
        inits = [numpy_helper.from_array(numpy_helper.to_array(self.initializers[x], self.base_dir), x)
                 for x in sorted(needed)]
        out = helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
        sub = helper.make_model(helper.make_graph(sub_nodes, "weight", [], [out], inits),
                                opset_imports=self.model.opset_import)
        return np.asarray(ReferenceEvaluator(sub).run(None, {})[0])


SMALL_CONSTANT = 4096  # elements: larger constant tensors are not folded for shape inference


def _folded_size(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> int | None:
    """The element count of the output of an op that can make a large tensor from small inputs
    (None for other ops: their outputs are checked after evaluation)."""
    ins = [values.get(x) for x in node.input]
    try:
        if node.op_type == "ConstantOfShape":
            return int(np.prod(ins[0], dtype=np.int64))
        if node.op_type == "Expand":
            return int(np.prod(np.broadcast_shapes(ins[0].shape, tuple(int(d) for d in ins[1])), dtype=np.int64))
        if node.op_type == "Tile":
            return int(ins[0].size * np.prod(ins[1], dtype=np.int64))
        if node.op_type == "Range":
            return int(np.ceil((float(ins[1]) - float(ins[0])) / float(ins[2])))
    except (TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError):
        return SMALL_CONSTANT + 1
    return None


def _evaluate_node(node: onnx.NodeProto, values: dict[str, np.ndarray],
                   opsets: list[onnx.OperatorSetIdProto]) -> list[np.ndarray]:
    """Outputs of one node whose inputs are all in `values`, by the ONNX reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    inits = [numpy_helper.from_array(np.asarray(values[x]), x) for x in dict.fromkeys(node.input) if x]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
    sub = helper.make_model(helper.make_graph([node], "fold", [], outs, inits), opset_imports=opsets)
    return [np.asarray(v) for v in ReferenceEvaluator(sub).run(None, {})]


def fold_small_constants(model: onnx.ModelProto, base_dir: str = "") -> dict[str, np.ndarray]:
    """Values of the small tensors (at most SMALL_CONSTANT elements) that the top-level graph computes
    from small initializers and Constant nodes alone: shape arithmetic such as the ConstantOfShape /
    Concat / Reshape / Slice / Transpose / Cast chain that torch exports for F.pad's pads, which ONNX
    shape inference does not evaluate. Node by node in graph order, by the ONNX reference evaluator;
    a node that cannot be evaluated is left out (and so is everything computed from it)."""
    g = model.graph
    overridable = {i.name for i in g.input}  # an initializer listed as a graph input is a default only
    values = {t.name: numpy_helper.to_array(t, base_dir) for t in g.initializer
              if t.name not in overridable and int(np.prod(t.dims, dtype=np.int64)) <= SMALL_CONSTANT}
    constant_inits = set(values)
    for node in g.node:
        if node.op_type in NONDETERMINISTIC_OPS or node.domain not in ("", "ai.onnx") or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if any(x and x not in values for x in node.input) or (_folded_size(node, values) or 0) > SMALL_CONSTANT:
            continue
        try:
            outs = _evaluate_node(node, values, list(model.opset_import))
        except Exception:  # noqa: BLE001 - a node the evaluator cannot run stays unfolded
            continue
        for name, value in zip([o for o in node.output if o], outs):
            if value.size <= SMALL_CONSTANT:
                values[name] = value
    return {k: v for k, v in values.items() if k not in constant_inits}


def _skeleton(model: onnx.ModelProto, input_shapes: dict[str, list[int]],
              folded: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A light copy for shape inference: large initializers become typed inputs (no data); `folded`
    constants replace the nodes that compute them (nodes with an output not in `folded` stay)."""
    g = model.graph
    folded = folded or {}
    inputs = {i.name for i in g.input}
    small, extra_inputs = [], []
    for t in g.initializer:
        if t.data_type == onnx.TensorProto.INT64 or int(np.prod(t.dims, dtype=np.int64)) <= 64:
            small.append(t)
        elif t.name not in inputs:
            extra_inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    graph_inputs = []
    for vi in g.input:
        vi = onnx.ValueInfoProto.FromString(vi.SerializeToString())
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[vi.name]:
                dims.add().dim_value = int(d)
        graph_inputs.append(vi)
    nodes = []
    for n in g.node:
        if folded and n.output and all(o in folded for o in n.output if o):
            small += [numpy_helper.from_array(folded[o], o) for o in n.output if o]
        else:
            nodes.append(n)
    skel_graph = helper.make_graph(nodes, g.name, graph_inputs + extra_inputs,
                                   list(g.output), small, value_info=list(g.value_info))
    skel = helper.make_model(skel_graph, opset_imports=model.opset_import,
                             ir_version=max(model.ir_version, 4))
    return skel


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    if not vi.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
                 fold: bool = False, base_dir: str = "") -> dict[str, list[int | None]]:
    """Tensor name -> dims (None where unknown), by ONNX shape inference on a light copy; with
    `fold`, small constant subgraphs are evaluated first (fold_small_constants)."""
    skel = _skeleton(model, input_shapes or {}, fold_small_constants(model, base_dir) if fold else None)
    try:
        inferred = shape_inference.infer_shapes(skel, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes only improve reports; a model may defeat inference
        inferred = skel
    g = inferred.graph
    return {vi.name: _dims(vi) for vi in [*g.input, *g.value_info, *g.output]}


def _conv_out_spatial(in_spatial, kernel, strides, pads, dilations, auto_pad):
    return geometry.out_spatial(in_spatial, kernel, strides,
                                geometry.resolved_pads(in_spatial, kernel, strides, pads, dilations, auto_pad), dilations)


ShapeProbe = Callable[[list[str]], dict[str, list[int]]]  # tensor names -> their dims from one run


def _set_spatial(site: ConvSite, shapes: dict[str, list[int | None]]) -> None:
    """Fill the site's input and output spatial dims from known tensor dims, where they are known."""
    nsp = site.weight.ndim - 2
    inp = shapes.get(site.node.input[0], [])
    if site.in_spatial is None and len(inp) == nsp + 2 and all(d for d in inp[2:]):
        site.in_spatial = tuple(int(d) for d in inp[2:])
    out = shapes.get(site.node.output[0], [])
    if len(out) == nsp + 2 and all(d for d in out[2:]):
        site.out_spatial = tuple(int(d) for d in out[2:])
    elif site.in_spatial:
        site.out_spatial = _conv_out_spatial(site.in_spatial, site.kernel_shape, site.strides,
                                             site.pads, site.dilations, site.auto_pad)


def find_convs(model: onnx.ModelProto, base_dir: str = "",
               input_shapes: dict[str, list[int]] | None = None,
               shape_probe: ShapeProbe | None = None) -> list[ConvSite]:
    """Every Conv of the top-level graph, with its constant weight when it has one.

    Output sizes come from ONNX shape inference; where it cannot see them, from shape inference
    after folding small constant subgraphs, then from `shape_probe` (given the conv tensors'
    names, their dims from one run of the model; it raises GDWSError saying why it cannot).
    A site whose size stays unknown says why in `shape_note`."""
    resolver = ConstantResolver(model, base_dir)
    shapes: dict[str, list[int | None]] | None = None
    sites = []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        if shapes is None:
            shapes = infer_shapes(model, input_shapes)
        weight, wnodes, source = resolver.value(node.input[1])
        site = ConvSite(index=idx, node=node, name=node_label(node), weight=weight,
                        weight_source=source,
                        weight_producers={o for i in wnodes for o in model.graph.node[i].output})
        if weight is not None:
            a = node_attrs(node)
            nsp = weight.ndim - 2
            site.group = int(a.get("group", 1))
            site.strides = tuple(a.get("strides", [1] * nsp))
            site.pads = tuple(a.get("pads", [0] * 2 * nsp))
            site.dilations = tuple(a.get("dilations", [1] * nsp))
            ap = a.get("auto_pad", b"NOTSET")
            site.auto_pad = ap.decode() if isinstance(ap, bytes) else str(ap)
            _set_spatial(site, shapes)
        sites.append(site)
    _resolve_unknown_shapes(model, base_dir, input_shapes, shape_probe, sites)
    return sites


def _resolve_unknown_shapes(model: onnx.ModelProto, base_dir: str, input_shapes: dict[str, list[int]] | None,
                            shape_probe: ShapeProbe | None, sites: list[ConvSite]) -> None:
    """For sites whose output size shape inference left unknown: fold constants and infer again,
    then ask the probe; note on each site still unknown why."""
    def unknown() -> list[ConvSite]:
        return [s for s in sites if s.weight is not None and s.out_spatial is None]

    if not unknown():
        return
    shapes = infer_shapes(model, input_shapes, fold=True, base_dir=base_dir)
    for site in unknown():
        _set_spatial(site, shapes)
    if not unknown():
        return
    note = "ONNX shape inference cannot determine it (even with constant subgraphs folded)"
    if shape_probe is not None:
        names = list(dict.fromkeys(t for s in unknown() for t in (s.node.input[0], s.node.output[0])))
        try:
            probed = shape_probe(names)
        except GDWSError as e:
            note += f", and one ONNX Runtime run could not be made: {e}"
        else:
            for site in unknown():
                _set_spatial(site, probed)
    for site in unknown():
        site.shape_note = note


def site_geometry(site: ConvSite, in_spatial) -> tuple[list[int], list[int], list[int], list[int]]:
    """(kernel, strides, resolved pads, dilations) of a conv at this input size."""
    k = list(site.kernel_shape)
    pads = geometry.resolved_pads(list(in_spatial), k, list(site.strides), list(site.pads), list(site.dilations),
                         site.auto_pad)
    return k, list(site.strides), pads, list(site.dilations)
