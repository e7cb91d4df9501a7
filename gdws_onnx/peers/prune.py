"""Structured channel pruning by filter L1 norm (Li et al. 2017, "Pruning Filters for Efficient
ConvNets"), no fine-tuning: a conv drops its weakest output channels, and the next conv the
matching input channels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from gdws_onnx.errors import OptionError
from gdws_onnx.graph.cleanup import remove_unused
from gdws_onnx.graph.convs import ConstantResolver, ConvSite, find_convs
from gdws_onnx.graph.passes import PassResult
from gdws_onnx.graph.rewrite import Names, replace_convs
from gdws_onnx.peers.common import PeerLayer, PeerReport, PeerSite, require_output_sizes, site_macs, total_macs

# Ops that act on each channel on its own, so a pruned channel can be dropped through them.
CHANNELWISE_OPS = {"Relu", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
                   "Softplus", "Softsign", "Mish", "Gelu", "MaxPool", "AveragePool", "LpPool", "Identity"}


def filter_norms(weight: np.ndarray) -> np.ndarray:
    """L1 norm of every output filter: sum over (c, k...) of |W[o, c, k...]|, shape (O,)."""
    return np.abs(weight.astype(np.float64)).reshape(weight.shape[0], -1).sum(axis=1)


def kept_filters(weight: np.ndarray, fraction: float, multiple: int = 1) -> np.ndarray:
    """Sorted indices of the filters kept when the floor(fraction O) smallest-L1 ones are dropped
    (at least one is kept; ties drop the later filter). With `multiple` > 1 the kept count is
    rounded down to a multiple of it (at least `multiple`; layers narrower than that are kept whole)."""
    o = weight.shape[0]
    keep = max(o - math.floor(fraction * o + 1e-9), 1)
    if multiple > 1:
        keep = o if o <= multiple else max(keep // multiple * multiple, multiple)
    order = np.lexsort((-np.arange(o), -filter_norms(weight)))  # largest norm first, then lower index
    return np.sort(order[:keep])


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in set(n.input):
            if x:
                out.setdefault(x, []).append(n)
    return out


def channel_chain(graph: onnx.GraphProto, conv: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]
                  ) -> tuple[onnx.NodeProto | None, list[str], str]:
    """Follow a conv's output through channel-wise ops to the one Conv that reads it:
    (that conv, the tensors on the way, '') or (None, [], why the conv cannot be pruned)."""
    outputs = {o.name for o in graph.output}
    tensors = [conv.output[0]]
    while True:
        t = tensors[-1]
        if t in outputs:
            return None, [], "its output (or a channel-wise op's after it) is a graph output"
        nodes = consumers.get(t, [])
        if len(nodes) != 1:
            return None, [], f"'{t}' feeds {len(nodes)} nodes (only a chain to one conv is pruned)"
        n = nodes[0]
        if n.op_type == "Conv" and n.domain in ("", "ai.onnx") and n.input[0] == t and list(n.input).count(t) == 1:
            return n, tensors, ""
        if n.op_type in CHANNELWISE_OPS and n.domain in ("", "ai.onnx") and [x for x in n.input if x] == [t] \
                and len(n.output) == 1:
            tensors.append(n.output[0])
            continue
        return None, [], f"its output reaches {n.op_type} (only conv -> channel-wise ops -> conv chains are pruned)"


@dataclass(frozen=True)
class PruneSite(PeerSite):
    """A conv as pruning judges it: also the conv its output reaches through channel-wise ops
    (`channel_chain`), the tensors on the way, and why there is no such single conv ('' if there is)."""

    consumer: ConvSite | None = None
    chain: tuple[str, ...] = ()
    chain_reason: str = ""


@dataclass
class _PruneCandidate:
    site: ConvSite
    consumer: ConvSite
    chain: tuple[str, ...]


def _pruned_macs(sites: list[ConvSite], cands: list[_PruneCandidate], fraction: float,
                 multiple: int = 1) -> tuple[int, dict]:
    """Whole-model conv MACs when every candidate drops floor(fraction O) filters, and the kept
    filters per candidate conv name. A conv costs pixels x O' x C' x K (C' = kept inputs)."""
    keep = {c.site.name: kept_filters(c.site.weight, fraction, multiple) for c in cands}
    kept_in = {c.consumer.name: keep[c.site.name].size for c in cands}
    total = 0
    for s in sites:
        if s.weight is None or s.pixels is None:
            continue
        o = keep[s.name].size if s.name in keep else s.out_channels
        cg = kept_in.get(s.name, s.in_channels // s.group)
        total += s.pixels * o * cg * s.kernel_size
    return total, keep


def _pruned_conv(site: ConvSite, keep_out: np.ndarray | None, keep_in: np.ndarray | None,
                 bias: np.ndarray | None, names: Names) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The same Conv node reading W[keep_out][:, keep_in] (and bias[keep_out])."""
    w = site.weight if keep_out is None else site.weight[keep_out]
    w = w if keep_in is None else w[:, keep_in]
    node = onnx.NodeProto()
    node.CopyFrom(site.node)
    inits = [numpy_helper.from_array(np.ascontiguousarray(w), names.fresh(f"{site.name}/prune/weight"))]
    node.input[1] = inits[0].name
    if keep_out is not None and bias is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(bias[keep_out]),
                                             names.fresh(f"{site.name}/prune/bias")))
        node.input[2] = inits[1].name
    return inits, [node]


class PruneChannelsPass:
    """Drop the smallest-L1-norm output filters of every eligible conv (group 1, feeding exactly
    one group-1 conv through channel-wise ops only: `check`) and the matching input channels of that conv.

    Give one budget: `fraction` of each eligible conv's filters, or `mac_reduction` R (whole-model
    conv MACs before / after, all convs counted): the least uniform fraction (steps of 1/512) that
    reaches R. No fine-tuning. Per layer, `rank` / `max_rank` are kept / original output channels
    and `relative_error` the dropped share of ||W||_F^2. `call(model)` edits the model in place;
    its report is a PeerReport.
    multiple: keep filter counts that are multiples of it (see `kept_filters`): ONNX Runtime's CPU
    convs are much faster at widths that are multiples of 8 (on the zoo VGG, pruning 64 -> 63 and
    128 -> 126 filters, 1.02x fewer MACs, ran 1.4x slower at batch 1 and 2.1x at batch 32; docs/results.md).
    """

    def __init__(self, mac_reduction: float | None = None, fraction: float | None = None,
                 skip_first: bool = True, input_shapes: dict[str, list[int]] | None = None,
                 multiple: int = 1):
        if multiple < 1:
            raise OptionError(f"{{0}} must be >= 1, got {multiple}", "multiple")
        if (mac_reduction is None) == (fraction is None):
            raise OptionError("give one of {0} or {1}", "mac_reduction", "fraction")
        if mac_reduction is not None and not mac_reduction >= 1:
            raise OptionError(f"{{0}} must be >= 1, got {mac_reduction}", "mac_reduction")
        if fraction is not None and not 0 <= fraction < 1:
            raise OptionError(f"{{0}} must be in [0, 1), got {fraction}", "fraction")
        self.mac_reduction = mac_reduction
        self.fraction = fraction
        self.skip_first = skip_first
        self.input_shapes = input_shapes
        self.multiple = multiple

    def check(self, site: PruneSite) -> str | None:
        """Why a conv's output channels are not pruned (None: they are a candidate)."""
        conv, consumer = site.conv, site.consumer
        if conv.weight is None:
            return conv.weight_source
        if conv.group != 1:
            return f"grouped conv (group={conv.group}; pruning needs group=1)"
        if site.first and self.skip_first:
            return "first conv (skip_first=False to include)"
        if site.chain_reason:
            return site.chain_reason
        if consumer is None or consumer.weight is None:
            return "the conv it feeds has no constant weight"
        if consumer.group != 1:
            return f"the conv it feeds is grouped (group={consumer.group})"
        if conv.pixels is None or consumer.pixels is None:
            return "output size unknown (give input_shapes)"
        return None

    def call(self, model: onnx.ModelProto) -> PassResult:
        mac_reduction, fraction, multiple = self.mac_reduction, self.fraction, self.multiple
        graph = model.graph
        sites = find_convs(model, input_shapes=self.input_shapes)
        by_node = {id(s.node): s for s in sites}
        consumers = _consumers(graph)
        reasons, cands = {}, []
        for i, s in enumerate(sites):
            nxt, chain, why = channel_chain(graph, s.node, consumers) if s.weight is not None else (None, [], "")
            consumer = by_node.get(id(nxt)) if nxt is not None else None
            reason = self.check(PruneSite(s, i == 0, consumer, tuple(chain), why))
            reasons[s.name] = reason or ""
            if reason is None:
                cands.append(_PruneCandidate(s, consumer, tuple(chain)))
        report = PeerReport(method="prune_channels", target=mac_reduction)
        if mac_reduction is not None:
            require_output_sizes(sites)
            total = sum(site_macs(s) for s in sites if s.weight is not None)
            fractions = np.arange(512) / 512
            fraction = next((f for f in fractions
                             if _pruned_macs(sites, cands, f, multiple)[0] <= total / mac_reduction), fractions[-1])
            report.met = _pruned_macs(sites, cands, fraction, multiple)[0] <= total / mac_reduction
        _, keep = _pruned_macs(sites, cands, fraction, multiple)
        keep = {c.site.name: keep[c.site.name] for c in cands if keep[c.site.name].size < c.site.out_channels}
        keep_in = {c.consumer.name: keep[c.site.name] for c in cands if c.site.name in keep}
        changed = [s for s in sites if s.name in keep or s.name in keep_in]
        resolver = ConstantResolver(model)
        bias = {s.name: s.node.input[2] for s in changed
                if s.name in keep and len(s.node.input) > 2 and s.node.input[2]}
        bias_values = {k: resolver.value(v)[0] for k, v in bias.items()}
        replace_convs(model, changed, lambda site, names: _pruned_conv(
            site, keep.get(site.name), keep_in.get(site.name), bias_values.get(site.name), names))
        remove_unused(graph, set(bias.values()))
        chain = {t for c in cands if c.site.name in keep for t in c.chain}
        for k in reversed(range(len(graph.value_info))):
            if graph.value_info[k].name in chain:  # their channel count changed
                del graph.value_info[k]
        kept_in_count = {k: v.size for k, v in keep_in.items()}
        for s in sites:
            report.layers.append(_prune_layer(s, reasons[s.name], keep.get(s.name), kept_in_count.get(s.name)))
        return PassResult(model, bool(changed), total_macs(report))


def _prune_layer(site: ConvSite, reason: str, keep: np.ndarray | None, kept_in: int | None) -> PeerLayer:
    macs = site_macs(site)
    layer = PeerLayer(name=site.name, status="skipped", reason=reason, macs_before=macs, macs_after=macs)
    if site.weight is None or macs is None:
        return layer
    o = keep.size if keep is not None else site.out_channels
    cg = kept_in if kept_in is not None else site.in_channels // site.group
    layer.macs_after = site.pixels * o * cg * site.kernel_size
    if keep is not None:
        w = site.weight.astype(np.float64)
        total = float((w**2).sum())
        layer.status, layer.rank, layer.max_rank = "rewritten", int(keep.size), site.out_channels
        layer.relative_error = 1 - float((w[keep] ** 2).sum()) / total if total > 0 else 0.0
    elif not reason:
        layer.reason = "nothing pruned at this fraction"
    if kept_in is not None and keep is None:
        layer.reason = (layer.reason + "; " if layer.reason else "") + f"inputs pruned to {kept_in}"
    return layer
