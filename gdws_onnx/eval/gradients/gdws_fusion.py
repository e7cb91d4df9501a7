"""GDWS layers of the torch replica evaluated as the one conv each equals.

A rewritten conv is [Gather ->] depthwise Conv -> 1x1 Conv (found by `graph.pattern`); it computes
y = P (D * Gather(x)) + b, a linear map equal to one conv with weight Q[m, c] = sum_{j: idx_j = c}
P[m, j] D_j: the same function at a fraction of the cost of a G-group depthwise conv in torch.
torch comes in through the tensors and the `torch` argument; it is never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from gdws_onnx.graph.convs import node_attrs
from gdws_onnx.graph.pattern import find_gdws_layers


@dataclass
class GDWSChain:
    """A Gather -> depthwise Conv -> 1x1 Conv chain (or its multiplier form without Gather)."""

    input: str
    output: str
    index: object  # torch int64 tensor of input channels per depthwise filter, None = j // (G / C)
    dw: object  # G x 1 x k... weight
    dw_bias: object
    pw: object  # M x G x 1... weight
    pw_bias: object
    dw_node: onnx.NodeProto
    dw_attrs: dict


def fuse_gdws_chains(nodes: list, consts: dict, graph_output: str) -> list:
    """`nodes` with every GDWS layer (graph.pattern) whose weights are constants replaced by one
    GDWSChain entry at the pointwise conv's place.

    A layer is fused only when the pointwise conv is a plain 1x1 (group 1, stride 1, no pads),
    the depthwise weight has one input channel per filter and as many filters as the pointwise
    conv has inputs, and the tensors fused away are read by nothing else: the depthwise output
    (and the Gather output) have the next conv as their single consumer. A Gather is fused when
    it selects constant channels on axis 1 for a conv with one group per filter; otherwise the
    depthwise conv alone is fused in its channel-multiplier form (filters a multiple of groups)."""
    consumers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    consumers[graph_output] = consumers.get(graph_output, 0) + 1
    graph = onnx.GraphProto()
    graph.node.extend(nodes)  # copies: the layers are mapped back to `nodes` by their outputs
    producer = {o: n for n in nodes for o in n.output}

    def single_use(name: str) -> bool:
        return consumers.get(name, 0) == 1

    drop, chains = set(), {}
    for layer in find_gdws_layers(graph):
        pw, dw = producer[layer.pointwise.output[0]], producer[layer.depthwise.output[0]]
        gather = producer[layer.gather.output[0]] if layer.gather is not None else None
        chain = _chain(pw, dw, gather, consts, single_use)
        if chain is None:
            continue
        drop |= {id(dw), id(pw)}
        if chain.index is not None:
            drop.add(id(gather))
        chains[id(pw)] = chain
    return [chains[id(n)] if id(n) in chains else n for n in nodes if id(n) not in drop or id(n) in chains]


def _chain(pw: onnx.NodeProto, dw: onnx.NodeProto, gather: onnx.NodeProto | None, consts: dict,
           single_use) -> GDWSChain | None:
    """The GDWSChain of one matched layer, or None when the structural conditions fail."""
    if len(pw.input) < 2 or pw.input[1] not in consts:
        return None
    pa = node_attrs(pw)
    w = consts[pw.input[1]]
    if pa.get("group", 1) != 1 or any(k != 1 for k in w.shape[2:]) or any(v != 1 for v in pa.get("strides", [1])) \
            or any(pa.get("pads", [0])) or pa.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    if not single_use(dw.output[0]) or dw.input[1] not in consts:
        return None
    dwt, da = consts[dw.input[1]], node_attrs(dw)
    if dwt.shape[1] != 1 or dwt.shape[0] != w.shape[1]:
        return None
    src, index = dw.input[0], None
    if gather is not None and node_attrs(gather).get("axis", 0) == 1 and gather.input[1] in consts \
            and single_use(gather.output[0]) and da.get("group", 1) == dwt.shape[0]:
        index, src = consts[gather.input[1]].reshape(-1).long(), gather.input[0]
    elif dwt.shape[0] % da.get("group", 1) != 0:
        return None
    return GDWSChain(src, pw.output[0], index, dwt,
                     consts.get(dw.input[2]) if len(dw.input) > 2 and dw.input[2] else None,
                     w, consts.get(pw.input[2]) if len(pw.input) > 2 and pw.input[2] else None,
                     dw, dict(da, group=1))


def fused_weight(torch, chain: GDWSChain, channels: int) -> tuple:
    """(Q, bias) of the one conv a chain equals on an input with `channels` channels:
    Q[m, c] = sum_{j: idx_j = c} P[m, j] D_j, bias = b_pw + P b_dw."""
    c = channels
    p = chain.pw.reshape(chain.pw.shape[0], -1)  # M x G
    d = chain.dw.reshape(chain.dw.shape[0], -1)  # G x K
    idx = chain.index if chain.index is not None else torch.arange(d.shape[0]) // (d.shape[0] // c)
    q = torch.zeros(p.shape[0], c, d.shape[1], dtype=p.dtype).index_add_(1, idx, p[:, :, None] * d[None])
    b = chain.pw_bias
    if chain.dw_bias is not None:
        b = (0 if b is None else b) + p @ chain.dw_bias
    return q.reshape(p.shape[0], c, *chain.dw.shape[2:]), b
