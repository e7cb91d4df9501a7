"""Graph pass: fold a GDWS layer's channel Gather into the Conv that produces its input.

Gather(axis=1, idx) commutes with every per-channel op (Relu, pooling, BatchNormalization,
...), so `Gather(act(Conv(x, W, B)), idx) == act'(Conv(x, W[idx], B[idx]))`, where act' has
its per-channel parameters gathered too. The producer then emits the G gathered channels
itself and no Gather is left to break ORT's blocked (NCHWc) layout, at the price of G/C
times the producer's MACs. Exact; whether it is faster is measured (latency.plan), not assumed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from gdws_onnx.graph.cleanup import consumed_names, remove_unused
from gdws_onnx.graph.convs import node_attrs, node_label
from gdws_onnx.graph.passes import PassResult
from gdws_onnx.graph.pattern import GDWSLayer, find_gdws_layers
from gdws_onnx.graph.rewrite import Names

# Ops that act on each channel alone (and keep channels on axis 1): a channel gather commutes.
CHANNELWISE = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
               "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Identity",
               "MaxPool", "AveragePool", "LpPool", "Dropout", "BatchNormalization"}
BN_PARAMS = slice(1, 5)  # scale, B, mean, var: one value per channel


@dataclass(frozen=True)
class Fold:
    """A Gather that can be folded: the producer Conv and the per-channel ops in between."""

    gather: str  # the Gather's output tensor (nodes are found by output: names may be empty)
    producer: str  # the producing Conv's output tensor
    chain: tuple[str, ...]  # outputs of the per-channel nodes from the producer to the Gather
    label: str  # the producer's name for reports (its output when the node is unnamed)


class GraphIndex:
    """Who produces and who reads each tensor of a graph, as it is when the index is made."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input}
        self.readers = Counter(i for n in graph.node for i in n.input if i)
        for n in graph.node:  # a tensor a subgraph captures is never private
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    self.readers.update({x: 2 for x in consumed_names(sub)})

    def private(self, tensor: str) -> bool:
        """Read by exactly one node and not a graph output."""
        return self.readers.get(tensor, 0) == 1 and tensor not in self.outputs

    def private_init(self, name: str) -> bool:
        """An in-file initializer only this node reads, and not overridable as a graph input."""
        return (name in self.inits and name not in self.inputs and self.private(name)
                and self.inits[name].data_location != onnx.TensorProto.EXTERNAL)


@dataclass(frozen=True)
class FoldSite:
    """One GDWS layer as the fold judges it: its nodes, and the graph as it is at that moment."""

    layer: GDWSLayer
    index: GraphIndex


def _gather_indices(g: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Gather" or node_attrs(node).get("axis", 0) != 1 or node.input[1] not in g.inits:
        return None
    idx = numpy_helper.to_array(g.inits[node.input[1]])
    return idx if idx.ndim == 1 else None


def plan_fold(site: FoldSite) -> Fold | str:
    """The fold of this layer's Gather, or why there is none: its input must come, through private
    per-channel ops, from a private group-1 Conv with initializer weights (and BatchNorm parameters)."""
    g, gather = site.index, site.layer.gather
    if gather is None:
        return "no Gather (the rewrite kept the channel order)"
    if _gather_indices(g, gather) is None:
        return "the Gather is not a constant 1-D gather on channels"
    tensor, chain = gather.input[0], []
    while True:
        node = g.producer.get(tensor)
        if node is None:
            return f"'{tensor}' is not computed by a node (a graph input or initializer)"
        if not g.private(tensor):
            return f"'{tensor}' has other readers or is a graph output"
        if node.op_type == "Conv":
            break
        if node.op_type not in CHANNELWISE or len([o for o in node.output if o]) != 1:
            return f"{node.op_type} '{node_label(node)}' lies between the Gather and a Conv (not a per-channel op)"
        if node.op_type == "BatchNormalization" and not all(g.private_init(p) for p in node.input[BN_PARAMS]):
            return f"BatchNormalization '{node_label(node)}' has parameters that are not its own initializers"
        if node.op_type == "Clip" and any(p and p not in g.inits for p in node.input[1:]):
            return f"Clip '{node_label(node)}' has bounds computed at run time"
        chain.append(node)
        tensor = node.input[0]
    group = node_attrs(node).get("group", 1)
    if group != 1:
        return f"the producer conv '{node_label(node)}' is grouped (group={group})"
    if not all(g.private_init(p) for p in node.input[1:] if p):
        return f"the producer conv '{node_label(node)}' has weights that are not its own in-file initializers"
    return Fold(gather.output[0], node.output[0], tuple(n.output[0] for n in reversed(chain)), node_label(node))


def fold_gather(model: onnx.ModelProto, fold: Fold) -> onnx.ModelProto:
    """Apply one fold in place: gather the producer's (and BatchNorms') per-channel parameters,
    drop the Gather, and forget the now wider intermediate tensors' recorded shapes."""
    graph = model.graph
    g = GraphIndex(graph)
    nodes = g.producer  # output tensor -> node
    gather = nodes[fold.gather]
    idx = _gather_indices(g, gather)
    names = Names(graph)
    for name in (fold.producer, *fold.chain):
        node = nodes[name]
        slots = range(1, len(node.input)) if node.op_type == "Conv" else \
            range(BN_PARAMS.start, BN_PARAMS.stop) if node.op_type == "BatchNormalization" else ()
        for k in slots:
            if not node.input[k]:
                continue
            old = g.inits[node.input[k]]
            new = numpy_helper.from_array(numpy_helper.to_array(old)[idx], names.fresh(old.name))
            graph.initializer.remove(old)
            graph.initializer.append(new)
            node.input[k] = new.name
    widened = {fold.producer, *fold.chain}
    for n in graph.node:
        for k, x in enumerate(n.input):
            if x == gather.output[0]:
                n.input[k] = gather.input[0]
    graph.node.remove(gather)
    remove_unused(graph, {gather.input[1]})
    keep = [v for v in graph.value_info if v.name not in widened | {gather.output[0]}]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return model


@dataclass
class FoldReport:
    """Per GDWS layer considered: the producer its Gather was folded into, or why it was not."""

    folded: dict[str, str] = field(default_factory=dict)  # layer -> producer conv
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> reason (FoldGatherPass.check)


class FoldGatherPass:
    """`call(model)` folds the Gathers of the named GDWS layers (all when `layers` is None), in graph
    order, wherever `check` finds no reason against it; the report says which and why not."""

    def __init__(self, layers: list[str] | None = None):
        self.layers = layers

    def check(self, site: FoldSite) -> str | None:
        """Why this layer's Gather cannot be folded (None: it can)."""
        plan = plan_fold(site)
        return plan if isinstance(plan, str) else None

    def call(self, model: onnx.ModelProto) -> PassResult:
        report = FoldReport()
        for layer in find_gdws_layers(model.graph):
            if self.layers is not None and layer.layer not in self.layers:
                continue
            plan = plan_fold(FoldSite(layer, GraphIndex(model.graph)))  # the graph as the earlier folds left it
            if isinstance(plan, str):
                report.skipped[layer.layer] = plan
                continue
            fold_gather(model, plan)
            report.folded[layer.layer] = plan.label
        return PassResult(model, bool(report.folded), report)
