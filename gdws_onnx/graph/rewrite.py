"""The graph pass: replace planned Conv nodes by Gather -> depthwise Conv -> pointwise Conv.

Operates on the ModelProto in place and touches nothing else: IR version, opsets, metadata,
graph I/O and every tensor it does not rewrite (external-data references included) stay as
they are. New nodes are named by `pattern.node_name` (`<conv>/gdws/gather|dw|pw`) so profiles
map back to layers. `replace_convs` (the splice and the orphan removal) and `Names` are shared
with the peer passes (peers/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gdws_onnx.core.decompose import GDWSFactors
from gdws_onnx.graph import pattern
from gdws_onnx.graph.cleanup import remove_unused
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.graph.passes import PassResult


@dataclass(frozen=True)
class LayerRewrite:
    """One Conv to replace and the GDWS factors that replace it."""

    site: ConvSite
    factors: GDWSFactors


class Names:
    """Fresh, deterministic names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {x for n in graph.node for x in (n.name, *n.input, *n.output)}
        self.used |= {t.name for t in graph.initializer}
        self.used |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}

    def fresh(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`, ...: the first name not used yet (it is used from now on)."""
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


SubgraphBuilder = Callable[[ConvSite, Names], tuple[list[onnx.TensorProto], list[onnx.NodeProto]]]


def replace_convs(model: onnx.ModelProto, sites: list[ConvSite], build: SubgraphBuilder) -> onnx.ModelProto:
    """Replace each site's Conv node, in place and in order, by the nodes `build(site, names)`
    returns; its weights become initializers (Constant nodes when IR < 4, which wants every
    initializer listed as an input). Then drop the weight subgraphs nothing reads anymore."""
    graph = model.graph
    names = Names(graph)
    by_index = {s.index: s for s in sites}
    as_constants = model.ir_version < 4
    new_inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        site = by_index.get(i)
        if site is None:
            nodes.append(node)
            continue
        weights, new_nodes = build(site, names)
        if as_constants:
            nodes.extend(helper.make_node("Constant", [], [t.name], name=t.name, value=t)
                         for t in weights)
        else:
            new_inits.extend(weights)
        nodes.extend(new_nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    remove_orphans(graph, sites)
    return model


def remove_orphans(graph: onnx.GraphProto, sites: list[ConvSite]) -> None:
    """Drop the replaced convs' weight nodes and initializers that nothing reads anymore."""
    remove_unused(graph, {s.node.input[1] for s in sites} | {o for s in sites for o in s.weight_producers})


@dataclass
class RewriteReport:
    """The convs the rewrite replaced, in graph order."""

    layers: list[str]


class GDWSRewritePass:
    """`call(model)` replaces each planned Conv (the plan decided which: no per-site check) and
    removes the weight subgraphs it orphaned; the report lists the replaced convs."""

    def __init__(self, rewrites: list[LayerRewrite]):
        self.rewrites = {r.site.index: r for r in rewrites}

    def call(self, model: onnx.ModelProto) -> PassResult:
        sites = [r.site for r in self.rewrites.values()]
        replace_convs(model, sites, lambda site, names: gdws_subgraph(self.rewrites[site.index], names))
        return PassResult(model, bool(sites), RewriteReport([s.name for s in sorted(sites, key=lambda s: s.index)]))


def gdws_subgraph(r: LayerRewrite, names: Names) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The GDWS realization of one conv (a `SubgraphBuilder` result): [Gather ->] depthwise
    (or stacked depthwise + Concat) -> pointwise, with the conv's bias on the pointwise conv."""
    site, f = r.site, r.factors
    conv = site.node

    def name(role: str) -> str:
        return names.fresh(pattern.node_name(site.name, role))

    x, out = conv.input[0], conv.output[0]
    weights, nodes = [], []
    g_total = f.depthwise.shape[0]
    if not f.multiplier and not np.array_equal(f.gather, np.arange(site.in_channels)):
        idx = numpy_helper.from_array(f.gather, name("gather_indices"))
        gathered = name("gather_out")
        weights.append(idx)
        nodes.append(helper.make_node("Gather", [x, idx.name], [gathered],
                                      name=name(pattern.GATHER), axis=1))
        x = gathered
    dw_w = numpy_helper.from_array(f.depthwise, name("dw_weight"))
    pw_w = numpy_helper.from_array(f.pointwise, name("pw_weight"))
    weights += [dw_w, pw_w]
    dw_out = name("dw_out")
    spatial = dict(kernel_shape=list(site.kernel_shape), strides=list(site.strides),
                   dilations=list(site.dilations),
                   group=site.in_channels if f.multiplier else g_total)
    if site.auto_pad == "NOTSET":
        spatial["pads"] = list(site.pads)
    else:
        spatial["auto_pad"] = site.auto_pad
    if f.stacked:
        weights.remove(dw_w)  # the depthwise kernels go in one initializer per term
        nodes += _stacked_depthwise(x, f, site.in_channels, dw_out, spatial, name, weights)
    else:
        nodes.append(helper.make_node("Conv", [x, dw_w.name], [dw_out],
                                      name=name(pattern.DEPTHWISE), **spatial))
    ones = [1] * len(site.kernel_shape)
    pw_inputs = [dw_out, pw_w.name] + ([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])
    nodes.append(helper.make_node("Conv", pw_inputs, [out], name=name(pattern.POINTWISE),
                                  kernel_shape=ones, group=f.groups))
    return weights, nodes


def _stacked_depthwise(x: str, f: GDWSFactors, channels: int, out: str, spatial: dict,
                       name: Callable[[str], str], weights: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """The stacked form's depthwise stage: one depthwise conv (group = C) per term t on x, with the
    kernels f.depthwise[t C:(t + 1) C], concatenated on the channel axis into `out` (appends the
    kernels to `weights`)."""
    nodes, outs = [], []
    for t in range(f.terms):
        w = numpy_helper.from_array(f.depthwise[t * channels:(t + 1) * channels], name("dw_weight"))
        weights.append(w)
        outs.append(out if f.terms == 1 else name("dw_out"))
        nodes.append(helper.make_node("Conv", [x, w.name], [outs[-1]], name=name(pattern.DEPTHWISE),
                                      **{**spatial, "group": channels}))
    if f.terms > 1:
        nodes.append(helper.make_node("Concat", outs, [out], name=name(pattern.CONCAT), axis=1))
    return nodes


def single_node_model(node: onnx.NodeProto, weight: np.ndarray, bias_size: int | None, input_shape: list[int],
                      graph_name: str = "layer", opset: int = 17) -> onnx.ModelProto:
    """A model of one node (a copy of `node`) for timing: input `x` of the static `input_shape`,
    the weight `W`, a bias `B` of zeros(bias_size) when bias_size is given (its values do not
    change the time), output `y`; IR 8."""
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    inits = [numpy_helper.from_array(weight, "W")]
    if bias_size:
        inits.append(numpy_helper.from_array(np.zeros(bias_size, weight.dtype), "B"))
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(["x", "W"] + (["B"] if bias_size else []))
    del copy.output[:]
    copy.output.append("y")
    graph = helper.make_graph([copy], graph_name, [helper.make_tensor_value_info("x", elem, list(input_shape))],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def layer_model(site: ConvSite, batch: int, factors: GDWSFactors | None = None,
                opset: int = 17) -> onnx.ModelProto:
    """A model holding just this conv (or its GDWS form) at its real input shape, for timing."""
    if site.in_spatial is None or site.weight is None:
        raise ValueError(f"conv '{site.name}' needs a constant weight and a known input shape")
    has_bias = len(site.node.input) > 2 and bool(site.node.input[2])
    model = single_node_model(site.node, site.weight, site.out_channels if has_bias else None,
                              [batch, site.in_channels, *site.in_spatial], "layer", opset)
    if factors is not None:
        local = ConvSite(**{**site.__dict__, "index": 0, "node": model.graph.node[0], "weight_producers": set()})
        GDWSRewritePass([LayerRewrite(local, factors)]).call(model)
    return model
