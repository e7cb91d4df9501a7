"""Budget planners: each fills in the candidates' ranks under one kind of budget and returns a
`BudgetPlan`; `planner_for` picks the planner the options ask for (`PLANNERS`).

A planner's `plan(cands, sites, model)` sets `ranks` on the candidates it rewrites and `reason`
on those it leaves alone (the latency planner also `multiplier`, `measured_ratio`, `fold`).
`sites` are all the model's convs (the MAC budget counts the ones left alone), `model` the
unmodified original (the latency planner measures it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from gdws_onnx.core import allocate, decompose
from gdws_onnx.errors import OptionError, literal
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.pipeline.candidates import BudgetPlan, Candidate
from gdws_onnx.pipeline.latency import LatencyPlanner
from gdws_onnx.pipeline.options import OptimizeOptions
from gdws_onnx.pipeline.report import BudgetReport


class Planner(Protocol):
    def plan(self, cands: list[Candidate], sites: list[ConvSite], model: onnx.ModelProto) -> BudgetPlan:
        """Choose the candidates' ranks (or reasons) and report the budget."""
        ...


@dataclass
class ErrorPlanner:
    """Every candidate at the fewest terms whose relative weighted error is at most `eps`."""

    eps: float
    width_multiple: int = 1

    def plan(self, cands: list[Candidate], sites: list[ConvSite], model: onnx.ModelProto) -> BudgetPlan:
        for c in cands:
            c.ranks, _ = allocate.relative_lego(decompose.scores(c.spec, c.alpha), self.eps, c.site.weight.dtype)
        round_widths(cands, self.width_multiple, down=False)
        return BudgetPlan(BudgetReport(mode="error", target=self.eps, achieved=None))


@dataclass
class MacPlanner:
    """Whole-model conv MACs divided by `reduction`, terms allocated across the candidates."""

    reduction: float
    width_multiple: int = 1

    def plan(self, cands: list[Candidate], sites: list[ConvSite], model: onnx.ModelProto) -> BudgetPlan:
        require_sizes([s for s in sites if s.weight is not None], "mac_reduction", "every conv's")
        cand_names = {c.site.name for c in cands}
        fixed = sum(s.pixels * s.macs_per_pixel for s in sites if s.weight is not None and s.name not in cand_names)
        total = fixed + sum(c.site.pixels * c.site.macs_per_pixel for c in cands)
        result = allocate.allocate_macs(layer_costs(cands), total / self.reduction - fixed)
        for c, r in zip(cands, result.ranks):
            c.ranks = r
            if r is None:
                c.reason = "not chosen by the MAC budget (GDWS would not be cheaper)"
        round_widths(cands, self.width_multiple, down=True)
        return BudgetPlan(BudgetReport(
            mode="macs", target=self.reduction, achieved=None, met=result.feasible,
            message="" if result.feasible else
            "budget cannot be met with the eligible layers: every rewritten layer keeps one term"))


@dataclass
class MismatchPlanner:
    """Fewest MACs with the predicted top-1 mismatch sum alpha * e at most `budget`: one global
    greedy over all candidates' alpha s^2 / cost terms (allocate.allocate_mismatch)."""

    budget: float
    width_multiple: int = 1

    def plan(self, cands: list[Candidate], sites: list[ConvSite], model: onnx.ModelProto) -> BudgetPlan:
        missing = [c.site.name for c in cands if not c.weighted]
        if missing:
            raise OptionError("{0} needs alphas for every rewritable conv; {1} has none "
                              f"for {literal(missing[:3])}{'...' if len(missing) > 3 else ''}", "mismatch_budget", "alphas")
        require_sizes([c.site for c in cands], "mismatch_budget", "every candidate conv's")
        result = allocate.allocate_mismatch(layer_costs(cands), self.budget)
        for c, r in zip(cands, result.ranks):
            c.ranks = r
            if r is None:
                c.reason = "not chosen by the mismatch budget (no term fits that makes GDWS cheaper)"
        round_widths(cands, self.width_multiple, down=False)
        return BudgetPlan(BudgetReport(mode="mismatch", target=self.budget, achieved=None))


@dataclass
class UniformPlanner:
    """Every channel of every candidate keeps min(rank, its max rank) terms (rank 1: plain DWS);
    a baseline, not a budget (widths are not rounded)."""

    rank: int

    def plan(self, cands: list[Candidate], sites: list[ConvSite], model: onnx.ModelProto) -> BudgetPlan:
        for c in cands:
            c.ranks = np.full(c.spec.in_channels, min(self.rank, c.spec.max_rank), dtype=np.int64)
        return BudgetPlan(BudgetReport(mode="uniform", target=self.rank, achieved=None))


PLANNERS: dict[str, Callable[[OptimizeOptions], Planner]] = {  # BudgetOptions.planner -> its planner
    "error": lambda o: ErrorPlanner(o.budget.error, o.budget.width_multiple),
    "macs": lambda o: MacPlanner(o.budget.mac_reduction, o.budget.width_multiple),
    "mismatch": lambda o: MismatchPlanner(o.budget.mismatch_budget, o.budget.width_multiple),
    "uniform": lambda o: UniformPlanner(o.budget.uniform_rank),
    "latency": lambda o: LatencyPlanner(o.budget, o.timing, o.run, ranks=None if o.budget.mismatch_budget is None
                                        else MismatchPlanner(o.budget.mismatch_budget, o.budget.width_multiple),
                                        quantize=o.calibration.quantize),
}


def planner_for(opts: OptimizeOptions) -> Planner:
    """The planner of the budget the options ask for."""
    return PLANNERS[opts.budget.planner](opts)


def layer_costs(cands: list[Candidate]) -> list[allocate.LayerCost]:
    """Each candidate's term scores, MACs per GDWS term and original MACs (output sizes known)."""
    return [allocate.LayerCost(
        scores=decompose.scores(c.spec, c.alpha),
        term_cost=c.site.pixels * (c.spec.kernel_size + c.spec.out_channels / c.spec.groups),
        original_cost=c.site.pixels * c.site.macs_per_pixel) for c in cands]


def round_widths(cands: list[Candidate], multiple: int, down: bool) -> None:
    """Round every chosen layer's GDWS width to a multiple: up (extra terms, less error) except
    under a MAC budget, where the lowest-value terms go instead so the budget stays met."""
    if multiple <= 1:
        return
    for c in cands:
        if c.ranks is not None:
            c.ranks = allocate.round_width(decompose.scores(c.spec, c.alpha), c.ranks, c.spec.channel_group(),
                                           multiple, down=down)


def require_sizes(sites: list[ConvSite], param: str, which: str) -> None:
    """Raise OptionError (naming `param`) unless every site's output size is known, saying why it is not."""
    unknown = [s for s in sites if s.pixels is None]
    if unknown:
        names = [s.name for s in unknown]
        why = unknown[0].shape_note or "shape inference cannot see it"
        raise OptionError(f"{{0}} needs {which} output size; it is unknown for {literal(names[:3])}"
                          f"{'...' if len(names) > 3 else ''}: {literal(why)}", param)
