"""What a graph still reads, and removal of the values nothing reads anymore (after a pass replaced
the nodes that read them)."""

from __future__ import annotations

import onnx


def consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Names read by any node (subgraphs included: they may capture outer tensors) or graph output."""
    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        a.graphs if a.type == onnx.AttributeProto.GRAPHS else []):
                names |= consumed_names(sub)
    return names


def remove_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove, in place, the values among `names` that nothing reads (`consumed_names`) and that are
    not graph inputs: every node whose outputs are all such values, then in turn the nodes that
    only fed those nodes' inputs, and finally the initializers among them. Values outside `names`
    (and their producers) are never touched."""
    names = set(names)
    while True:
        consumed = consumed_names(graph)
        dead = [k for k, n in enumerate(graph.node)
                if n.output and set(n.output) <= names and not (set(n.output) & consumed)]
        if not dead:
            break
        for k in reversed(dead):
            names.update(graph.node[k].input)
            del graph.node[k]
    consumed = consumed_names(graph)
    inputs = {i.name for i in graph.input}
    for k in reversed(range(len(graph.initializer))):
        t = graph.initializer[k]
        if t.name in names and t.name not in consumed and t.name not in inputs:
            del graph.initializer[k]
