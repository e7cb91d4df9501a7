"""Fully connected layers rewritten as sums of Kronecker products or plain low rank (ONNX only).

A site is a Gemm or a MatMul whose second input is a constant 2-D weight. It computes
y = alpha x W^T + beta C (Gemm: W = B^T, or B with transB = 1; x = A, or A^T with transA = 1;
C broadcast to [M, m]) or y = x W^T (MatMul x @ B, x of any rank >= 1: W = B^T), W of shape
(m, n) = (out, in). A Gemm with transA = 1 reads A [n, M]: its subgraph starts with a Transpose
(perm [1, 0], `<fc>/<scope>/transpose_in`) to x [M, n], then goes on as below.
The factors of core/kronecker.py approximate site.matrix() = alpha W and become:

  kronecker, B first: Reshape x to [..., q, s] -> MatMul [s, R r] (the B_t^T side by side)
      -> (R > 1: Reshape [..., q, R, r] -> Transpose [..., R, q, r] -> Reshape [..., R q, r])
      -> MatMul [p, R q] (the A_t side by side) on the left, broadcast -> [..., p, r] -> Reshape [..., m]
  kronecker, A first: Reshape x to [..., q, s] -> MatMul [R p, q] (the A_t stacked) on the left
      -> (R > 1: Reshape [..., R, p, s] -> Transpose [..., p, R, s] -> Reshape [..., p, R s])
      -> MatMul [R s, r] (the B_t^T stacked) -> [..., p, r] -> Reshape [..., m]
  lowrank: MatMul [n, R] (V^T) -> MatMul [R, m] (U^T)

then Add C, through a Mul by beta when beta != 1 (ONNX Runtime folds it when C is constant).
No Einsum. Leading dims stay as they are (Reshape copies them with 0), so the input's rank must
be known. New nodes are named `<fc>/kron/<role>` and `<fc>/lowrank/<role>` (graph/pattern.py);
IR version, opsets, metadata and graph I/O are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gdws_onnx.core.kronecker import (
    A_FIRST, SCHEMES, FCFactors, KroneckerFactors, LowRankFactors, SchemeComparison, check_budgets,
    compare_schemes, kronecker_shapes,
)
from gdws_onnx.errors import OptionError, OptionText
from gdws_onnx.graph.convs import ConstantResolver, infer_shapes, node_attrs, node_label
from gdws_onnx.graph.passes import PassResult
from gdws_onnx.graph.pattern import node_name
from gdws_onnx.graph.rewrite import Names, replace_convs, single_node_model

FC_OPS = ("Gemm", "MatMul")
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
# elements: smaller FC weights are left alone (optimize's force=True lowers it to 0, except under
# target="latency", where pipeline.fc_latency keeps it)
MIN_WEIGHT = 1024
DEFAULT_ERROR_BUDGET = 0.1  # relative squared Frobenius error when no budget is given
KRON_SCOPE, LOWRANK_SCOPE = "kron", "lowrank"  # node name scopes (pattern.SCOPES)


@dataclass
class FCSite:
    """One Gemm or MatMul of the top-level graph and what the rewrite needs to know of it."""

    index: int  # position in graph.node
    node: onnx.NodeProto
    name: str  # node name, or its output name when the node is unnamed
    weight: np.ndarray | None  # the constant second input as stored; None when computed at run time
    weight_source: str  # "initializer", "Constant", "folded subgraph" or why it is not constant
    weight_producers: set[str] = field(default_factory=set)  # outputs of its weight subgraph's nodes
    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    bias: str = ""  # Gemm's C input ("" when there is none)
    input_rank: int | None = None  # rank of the first input, when shape inference knows it
    opset: int = 0  # the model's ai.onnx opset

    @property
    def op(self) -> str:
        return self.node.op_type

    def matrix(self) -> np.ndarray:
        """alpha W, (out, in), in float64: what the factors approximate."""
        w = np.asarray(self.weight, dtype=np.float64)
        return self.alpha * (w if self.trans_b else w.T)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0 if self.trans_b else 1])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1 if self.trans_b else 0])

    @property
    def feature_axis(self) -> int:
        """The input axis of the in_features: the last, or the first of Gemm's A with transA = 1."""
        return 0 if self.trans_a else -1

    @property
    def batch_axis(self) -> int:
        """The input axis of the rows (where a timing sets its batch): the first, or the last of
        Gemm's A with transA = 1."""
        return -1 if self.trans_a else 0

    @property
    def macs(self) -> int:
        """Dense MACs (and weights) per input row."""
        return self.out_features * self.in_features


def _ai_onnx_opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def find_fc_sites(model: onnx.ModelProto, base_dir: str = "",
                  input_shapes: dict[str, list[int]] | None = None) -> list[FCSite]:
    """Every Gemm and MatMul of the top-level graph, with its constant weight when it has one
    (initializer, Constant node, or a constant subgraph such as a Cast, by ConstantResolver) and
    the rank of its first input (Gemm: 2; MatMul: by ONNX shape inference)."""
    resolver = ConstantResolver(model, base_dir)
    opset = _ai_onnx_opset(model)
    shapes: dict[str, list[int | None]] | None = None
    sites = []
    for idx, node in enumerate(model.graph.node):
        if node.op_type not in FC_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight, wnodes, source = resolver.value(node.input[1])
        site = FCSite(index=idx, node=node, name=node_label(node), weight=weight, weight_source=source,
                      weight_producers={o for i in wnodes for o in model.graph.node[i].output}, opset=opset)
        if node.op_type == "Gemm":
            a = node_attrs(node)
            site.trans_a, site.trans_b = bool(a.get("transA", 0)), bool(a.get("transB", 0))
            site.alpha, site.beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            site.bias = node.input[2] if len(node.input) > 2 else ""
            site.input_rank = 2
        else:
            if shapes is None:
                shapes = infer_shapes(model, input_shapes)
            site.input_rank = len(shapes.get(node.input[0], [])) or None
        sites.append(site)
    return sites


def fc_skip_reason(site: FCSite, scheme: str | None = None, min_weight: int = MIN_WEIGHT) -> str | None:
    """Why the site cannot be rewritten (by `scheme`, when given), or None when it can."""
    if site.weight is None:
        return site.weight_source
    if site.weight.ndim != 2:
        return f"the weight has shape {list(site.weight.shape)}: only a 2-D weight makes an FC layer"
    if site.weight.dtype.type not in FLOAT_DTYPES:
        return f"weight dtype {site.weight.dtype} is not float16, float32 or float64"
    if site.input_rank is None:
        return "the input's rank is unknown (ONNX shape inference cannot tell it)"
    if site.weight.size < min_weight:
        return OptionText(f"the weight has {site.weight.size} elements, fewer than min_weight={min_weight} "
                          "({0} overrides it)", "force=True")
    if scheme == "kronecker":
        if site.opset < 5:
            return f"opset {site.opset} predates Reshape with a shape input (5)"
        if not kronecker_shapes(site.out_features, site.in_features):
            return (f"a {site.out_features} x {site.in_features} weight has no Kronecker factor shape "
                    "other than dense or plain low rank")
    return None


@dataclass(frozen=True)
class FCPlan:
    """One FC site and the factors (of site.matrix()) that replace it."""

    site: FCSite
    factors: FCFactors
    comparison: SchemeComparison | None = None  # both schemes at the planning budget, for the report


@dataclass(frozen=True)
class FCLayerReport:
    """One rewritten FC layer: its structure, predicted error and cost against the dense layer."""

    name: str
    op: str
    out_features: int
    in_features: int
    scheme: str
    structure: str  # e.g. "kronecker 4x8 (x) 16x32, rank 3, b first"
    rank: int
    error: float  # predicted relative squared Frobenius error of alpha W
    macs: int  # per input row
    dense_macs: int
    params: int
    dense_params: int
    winner: str | None = None  # the scheme that wins on error per MAC at the planning budget


@dataclass
class FCReport:
    """What the FC rewrite did: the layers it rewrote and, for the others, why not."""

    layers: list[FCLayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, reason)


def _factor_dims(f: FCFactors) -> tuple[int, int]:
    if isinstance(f, KroneckerFactors):
        return f.shape.m, f.shape.n
    return int(f.u.shape[0]), int(f.v.shape[1])


def _layer_report(plan: FCPlan) -> FCLayerReport:
    s, f = plan.site, plan.factors
    return FCLayerReport(
        name=s.name, op=s.op, out_features=s.out_features, in_features=s.in_features, scheme=f.scheme,
        structure=f.describe(), rank=f.rank, error=f.error, macs=f.macs, dense_macs=s.macs, params=f.params,
        dense_params=s.macs, winner=plan.comparison.winner if plan.comparison else None)


class _Builder:
    """Appends the initializers and nodes of one site's subgraph, named `<fc>/<scope>/<role>`."""

    def __init__(self, site: FCSite, scope: str, names: Names):
        self.site, self.scope, self.names = site, scope, names
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def const(self, role: str, value: np.ndarray) -> str:
        t = numpy_helper.from_array(np.asarray(value), self.names.fresh(node_name(self.site.name, role, self.scope)))
        self.inits.append(t)
        return t.name

    def node(self, op: str, role: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self.names.fresh(node_name(self.site.name, f"{role}_out", self.scope))
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.names.fresh(
            node_name(self.site.name, role, self.scope)), **attrs))
        return out

    def reshape(self, role: str, x: str, tail: list[int], output: str | None = None) -> str:
        """Reshape to [leading dims (copied by 0), *tail]."""
        lead = [0] * (self.site.input_rank - 1)
        return self.node("Reshape", role, [x, self.const(f"{role}_shape", np.array(lead + tail, np.int64))],
                         output)


def _kronecker_nodes(b: _Builder, f: KroneckerFactors, x: str, y: str) -> None:
    """x [..., n] -> y [..., m] by the factors in their order (module docstring)."""
    sh, rank = f.shape, f.rank
    lead = b.site.input_rank - 1
    swap = list(range(lead)) + [lead + 1, lead, lead + 2]  # swap the two axes before the last
    h = b.reshape("reshape_in", x, [sh.q, sh.s])
    if f.order == A_FIRST:
        h = b.node("MatMul", "a", [b.const("a_weight", f.a.reshape(rank * sh.p, sh.q)), h])
        if rank > 1:
            h = b.reshape("split", h, [rank, sh.p, sh.s])
            h = b.node("Transpose", "transpose", [h], perm=swap)
            h = b.reshape("merge", h, [sh.p, rank * sh.s])
        h = b.node("MatMul", "b", [h, b.const("b_weight", f.b.transpose(0, 2, 1).reshape(rank * sh.s, sh.r))])
    else:
        h = b.node("MatMul", "b", [h, b.const("b_weight", f.b.transpose(2, 0, 1).reshape(sh.s, rank * sh.r))])
        if rank > 1:
            h = b.reshape("split", h, [sh.q, rank, sh.r])
            h = b.node("Transpose", "transpose", [h], perm=swap)
            h = b.reshape("merge", h, [rank * sh.q, sh.r])
        h = b.node("MatMul", "a", [b.const("a_weight", f.a.transpose(1, 0, 2).reshape(sh.p, rank * sh.q)), h])
    b.reshape("reshape_out", h, [sh.m], y)


def _lowrank_nodes(b: _Builder, f: LowRankFactors, x: str, y: str) -> None:
    """x [..., n] -> x V^T [..., R] -> y = (x V^T) U^T [..., m]."""
    h = b.node("MatMul", "v", [x, b.const("v_weight", f.v.T)])
    b.node("MatMul", "u", [h, b.const("u_weight", f.u.T)], y)


def fc_subgraph(plan: FCPlan, names: Names) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The initializers and nodes that replace the plan's node, reading its input and writing its output."""
    site = plan.site
    f = plan.factors.astype(site.weight.dtype)
    b = _Builder(site, KRON_SCOPE if isinstance(f, KroneckerFactors) else LOWRANK_SCOPE, names)
    x, out = site.node.input[0], site.node.output[0]
    if site.trans_a:  # Gemm's A [n, M] -> x [M, n]
        x = b.node("Transpose", "transpose_in", [x], perm=[1, 0])
    with_bias = bool(site.bias) and site.beta != 0
    y = names.fresh(node_name(site.name, "pre_bias", b.scope)) if with_bias else out
    (_kronecker_nodes if isinstance(f, KroneckerFactors) else _lowrank_nodes)(b, f, x, y)
    if with_bias:
        c = site.bias
        if site.beta != 1:
            c = b.node("Mul", "beta", [c, b.const("beta_value", np.asarray(site.beta, dtype=site.weight.dtype))])
        b.node("Add", "bias", [y, c], out)
    return b.inits, b.nodes


class FCRewritePass:
    """`call(model)` replaces each planned Gemm/MatMul by its factors' subgraph (fc_subgraph) and
    removes the weight subgraphs it orphaned; `check(site)` says why a site is not rewritten.
    The plans' sites must come from find_fc_sites on this model."""

    def __init__(self, plans: list[FCPlan], min_weight: int = MIN_WEIGHT):
        self.plans = {p.site.index: p for p in plans}
        self.min_weight = min_weight

    def check(self, site: FCSite) -> str | None:
        """The reason the site is not rewritten, or None."""
        plan = self.plans.get(site.index)
        if plan is None:
            return "no plan for this layer"
        reason = fc_skip_reason(site, plan.factors.scheme, self.min_weight)
        if reason is not None:
            return reason
        dims = _factor_dims(plan.factors)
        if dims != (site.out_features, site.in_features):
            return f"the plan's factors are {dims[0]} x {dims[1]}, the weight {site.out_features} x {site.in_features}"
        return None

    def call(self, model: onnx.ModelProto) -> PassResult:
        report = FCReport()
        chosen = []
        for index, plan in sorted(self.plans.items()):
            nodes = model.graph.node
            reason = ("the model's node at this index is another one (a plan for another model)"
                      if index >= len(nodes) or nodes[index] != plan.site.node else self.check(plan.site))
            if reason is None:
                chosen.append(plan)
                report.layers.append(_layer_report(plan))
            else:
                report.skipped.append((plan.site.name, reason))
        if chosen:
            by_index = {p.site.index: p for p in chosen}
            replace_convs(model, [p.site for p in chosen], lambda site, names: fc_subgraph(by_index[site.index], names))
        return PassResult(model, bool(chosen), report)


def fc_layer_model(site: FCSite, input_shape: list[int], factors: FCFactors | None = None,
                   opset: int = 17) -> onnx.ModelProto:
    """A model holding just this Gemm/MatMul (or, given `factors`, its fc_subgraph form) at the
    static `input_shape`, for timing: input `x`, output `y`, the weight as the site stores it,
    Gemm's attributes as they are, and Gemm's C (when it has one) as zeros of [out_features], named B
    (the same Add for every batch; C's values do not change the time)."""
    if fc_skip_reason(site, min_weight=0) is not None:
        raise ValueError(f"FC layer '{site.name}' cannot be modelled: {fc_skip_reason(site, min_weight=0)}")
    if len(input_shape) != site.input_rank or input_shape[site.feature_axis] != site.in_features:
        raise ValueError(f"FC layer '{site.name}' takes rank {site.input_rank} inputs of {site.in_features} "
                         f"features, not shape {input_shape}")
    with_bias = site.op == "Gemm" and bool(site.bias)
    model = single_node_model(site.node, site.weight, site.out_features if with_bias else None, input_shape,
                              "fc_layer", opset)
    if factors is not None:
        local = replace(site, index=0, node=model.graph.node[0], weight_producers=set(),
                        bias="B" if with_bias else "", opset=opset)
        result = FCRewritePass([FCPlan(local, factors)], min_weight=0).call(model)
        if not result.modified:
            raise ValueError(f"FC layer '{site.name}': {result.report.skipped[0][1]}")
    return model


def _no_choice_reason(scheme: str, error_budget: float | None, mac_reduction: float | None) -> str:
    if error_budget is not None:
        return f"no {scheme} factorization found within error_budget={error_budget}"
    return f"rank 1 of every {scheme} factorization costs more than the dense MACs / {mac_reduction}"


def plan_fc(sites: list[FCSite], scheme: str, error_budget: float | None = None,
            mac_reduction: float | None = None, min_weight: int = MIN_WEIGHT, only_if_cheaper: bool = True,
            max_shapes: int | None = 32) -> tuple[list[FCPlan], list[tuple[str, str]]]:
    """Per site, `scheme`'s best factors at the budget (core.kronecker.compare_schemes, which also
    says which scheme wins on error per MAC); (plans, [(layer, why not)] for the rest). With
    `only_if_cheaper`, a layer whose factors cost at least the dense MACs is left alone."""
    if scheme not in SCHEMES:
        raise OptionError(f"{{0}} must be one of {', '.join(SCHEMES)}, got {scheme!r}", "scheme")
    check_budgets(error_budget, mac_reduction)
    plans, skipped = [], []
    for site in sites:
        reason = fc_skip_reason(site, scheme, min_weight)
        if reason is None:
            comparison = compare_schemes(site.matrix(), error_budget, mac_reduction, max_shapes=max_shapes,
                                         dtype=site.weight.dtype)
            f = comparison.chosen(scheme)
            if f is None:
                reason = _no_choice_reason(scheme, error_budget, mac_reduction)
            elif only_if_cheaper and f.macs >= site.macs:
                reason = f"{f.describe()} costs {f.macs} MACs per row, the dense layer {site.macs}"
            else:
                plans.append(FCPlan(site, f, comparison))
        if reason is not None:
            skipped.append((site.name, reason))
    return plans, skipped


def rewrite_fc(model: onnx.ModelProto, scheme: str = "kronecker", error_budget: float | None = None,
               mac_reduction: float | None = None, *, min_weight: int = MIN_WEIGHT, only_if_cheaper: bool = True,
               max_shapes: int | None = 32, base_dir: str = "",
               input_shapes: dict[str, list[int]] | None = None,
               exclude: Callable[[str], str | None] | None = None) -> PassResult:
    """Rewrite the model's FC layers (in place) by `scheme` ("kronecker" or "lowrank") at one budget:
    error_budget (relative squared Frobenius error of each weight, default DEFAULT_ERROR_BUDGET) or
    mac_reduction (each layer's MACs at most dense / R). The report (FCReport) has a row per
    rewritten layer, with the scheme that wins on error per MAC, and the reason for every other
    Gemm/MatMul. `exclude(name)` may return a reason to leave a layer alone (a selection by name).
    Nothing here runs the model: verify the result in ONNX Runtime."""
    if error_budget is None and mac_reduction is None:
        error_budget = DEFAULT_ERROR_BUDGET
    sites = find_fc_sites(model, base_dir, input_shapes)
    excluded = [(s.name, why) for s in sites if exclude is not None and (why := exclude(s.name))]
    sites = [s for s in sites if s.name not in dict(excluded)]
    plans, skipped = plan_fc(sites, scheme, error_budget, mac_reduction, min_weight, only_if_cheaper, max_shapes)
    skipped = excluded + skipped
    result = FCRewritePass(plans, min_weight).call(model)
    result.report.skipped[:0] = skipped
    return result
