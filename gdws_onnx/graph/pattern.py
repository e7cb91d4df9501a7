"""The GDWS node pattern, known in one place: how the rewrite names its nodes, and how to find them.

A rewritten conv `<conv>` becomes `[<conv>/gdws/gather: Gather] -> <conv>/gdws/dw: Conv (grouped)
-> <conv>/gdws/pw: Conv (1x1)`, or in the stacked form `<conv>/gdws/dw, dw_1, ...: Conv (depthwise)
-> <conv>/gdws/concat: Concat -> <conv>/gdws/pw`; spatial SVD writes `<conv>/ssvd/a|b`, Tucker-2 `<conv>/tucker/first|core|last`. Profiles, the
fold, the torch replica and the tests find layers through these functions, never by strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

SCOPES = ("gdws", "ssvd", "tucker", "kron", "lowrank")  # GDWS, spatial SVD, Tucker-2, the FC rewrites (graph/fc.py)
GATHER, DEPTHWISE, POINTWISE = "gather", "dw", "pw"
CONCAT = "concat"  # the stacked form: r depthwise convs `dw`, `dw_1`, ... -> Concat -> pw


def node_name(layer: str, role: str, scope: str = "gdws") -> str:
    """'<layer>/gdws/<role>': the name the rewrite gives a node of `layer`."""
    return f"{layer}/{scope}/{role}"


def layer_of(name: str) -> str:
    """'<conv>/gdws/dw' or '<conv>/ssvd/a' -> '<conv>'; any other name is its own layer."""
    for scope in SCOPES:
        name = name.split(f"/{scope}/")[0]
    return name


def role_of(name: str, scope: str = "gdws") -> str | None:
    """'<conv>/gdws/dw' -> 'dw' (a fresh-name suffix such as 'dw_1' is kept); None outside the scope."""
    marker = f"/{scope}/"
    return name.split(marker, 1)[1] if marker in name else None


def is_gdws_node(node: onnx.NodeProto, role: str | None = None) -> bool:
    """True for a node the GDWS rewrite made (of the given role: 'gather', 'dw', 'pw')."""
    r = role_of(node.name)
    return r is not None and (role is None or r.split("_")[0] == role)


@dataclass(frozen=True)
class GDWSLayer:
    """The nodes of one rewritten conv in a graph (gather is None when the rewrite needed none)."""

    layer: str
    gather: onnx.NodeProto | None
    depthwise: onnx.NodeProto
    pointwise: onnx.NodeProto


def find_gdws_layers(graph: onnx.GraphProto) -> list[GDWSLayer]:
    """Every rewritten conv whose nodes still form the chain [Gather ->] dw Conv -> pw Conv,
    each link consuming the previous node's output, in graph order."""
    by_output = {o: n for n in graph.node for o in n.output}
    found = []
    for pw in graph.node:
        if pw.op_type != "Conv" or not is_gdws_node(pw, POINTWISE):
            continue
        dw = by_output.get(pw.input[0])
        if dw is None or dw.op_type != "Conv" or not is_gdws_node(dw, DEPTHWISE) \
                or layer_of(dw.name) != layer_of(pw.name):
            continue
        gather = by_output.get(dw.input[0])
        if gather is None or gather.op_type != "Gather" or not is_gdws_node(gather, GATHER) \
                or layer_of(gather.name) != layer_of(pw.name):
            gather = None
        found.append(GDWSLayer(layer_of(pw.name), gather, dw, pw))
    return found
