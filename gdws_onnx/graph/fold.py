"""Graph pass: fold a GDWS layer's channel Gather into the Conv that produces its input.

Gather(axis=1, idx) commutes with every per-channel op (Relu, pooling, BatchNormalization,
...), so `Gather(act(Conv(x, W, B)), idx) == act'(Conv(x, W[idx], B[idx]))`, where act' has
its per-channel parameters gathered too. The producer then emits the G gathered channels
itself and no Gather is left to break ORT's blocked (NCHWc) layout, at the price of G/C
times the producer's MACs. Exact; whether it is faster is measured (latency.plan), not assumed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from gdws_onnx.graph.convs import node_attrs, node_label
from gdws_onnx.graph.rewrite import Names, _consumed, layer_of

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


class _Graph:
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
                    self.readers.update({x: 2 for x in _consumed(sub)})

    def private(self, tensor: str) -> bool:
        """Read by exactly one node and not a graph output."""
        return self.readers.get(tensor, 0) == 1 and tensor not in self.outputs

    def private_init(self, name: str) -> bool:
        """An in-file initializer only this node reads, and not overridable as a graph input."""
        return (name in self.inits and name not in self.inputs and self.private(name)
                and self.inits[name].data_location != onnx.TensorProto.EXTERNAL)


def _gather_indices(g: _Graph, node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Gather" or node_attrs(node).get("axis", 0) != 1 or node.input[1] not in g.inits:
        return None
    idx = numpy_helper.to_array(g.inits[node.input[1]])
    return idx if idx.ndim == 1 else None


def foldable(model: onnx.ModelProto, gather: onnx.NodeProto) -> Fold | None:
    """The fold for this Gather, or None when its input does not come, through private per-channel
    ops, from a private group-1 Conv with initializer weights (and BatchNorm parameters)."""
    g = _Graph(model.graph)
    if _gather_indices(g, gather) is None:
        return None
    tensor, chain = gather.input[0], []
    while True:
        node = g.producer.get(tensor)
        if node is None or not g.private(tensor):
            return None
        if node.op_type == "Conv":
            break
        if node.op_type not in CHANNELWISE or len([o for o in node.output if o]) != 1:
            return None
        if node.op_type == "BatchNormalization" and not all(g.private_init(p) for p in node.input[BN_PARAMS]):
            return None
        if node.op_type == "Clip" and any(p and p not in g.inits for p in node.input[1:]):
            return None
        chain.append(node)
        tensor = node.input[0]
    params = [p for p in node.input[1:] if p]
    if node_attrs(node).get("group", 1) != 1 or not all(g.private_init(p) for p in params):
        return None
    return Fold(gather.output[0], node.output[0], tuple(n.output[0] for n in reversed(chain)),
                node_label(node))


def fold_gather(model: onnx.ModelProto, fold: Fold) -> onnx.ModelProto:
    """Apply one fold in place: gather the producer's (and BatchNorms') per-channel parameters,
    drop the Gather, and forget the now wider intermediate tensors' recorded shapes."""
    graph = model.graph
    g = _Graph(graph)
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
    if not any(gather.input[1] in n.input for n in graph.node):
        graph.initializer.remove(g.inits[gather.input[1]])
    keep = [v for v in graph.value_info if v.name not in widened | {gather.output[0]}]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return model


def gdws_gathers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Layer name -> its GDWS Gather node (named '<conv>/gdws/gather')."""
    return {layer_of(n.name): n for n in model.graph.node if n.op_type == "Gather" and "/gdws/gather" in n.name}


class FoldGatherPass:
    """`call(model)` folds the Gathers of the named GDWS layers (all when `layers` is None)
    wherever `foldable` allows; `folded` lists layer -> producer conv afterwards."""

    def __init__(self, layers: list[str] | None = None):
        self.layers = layers
        self.folded: dict[str, str] = {}

    def call(self, model: onnx.ModelProto) -> onnx.ModelProto:
        for layer, gather in gdws_gathers(model).items():
            if self.layers is not None and layer not in self.layers:
                continue
            fold = foldable(model, gather)
            if fold is not None:
                fold_gather(model, fold)
                self.folded[layer] = fold.label
        return model
