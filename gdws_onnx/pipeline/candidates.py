"""A conv the pipeline may rewrite, which convs are candidates, and the plan a budget planner returns.

Shared by the MAC/error planners (`budgets`), the latency planner (`latency`) and `optimize`,
so that none of them imports another for these."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from gdws_onnx.core import decompose
from gdws_onnx.errors import OptionText
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.pipeline.options import SelectionOptions
from gdws_onnx.pipeline.report import BudgetReport, LatencyReport


@dataclass
class Candidate:
    """An eligible conv, its per-channel spectrum and weights, and the plan chosen for it."""

    site: ConvSite
    spec: decompose.Spectrum
    alpha: np.ndarray
    weighted: bool = False  # alphas were given for this conv (`alpha` is not the default all-ones)
    ranks: np.ndarray | None = None  # terms per input channel; None = left alone
    multiplier: bool = False  # realize as a channel-multiplier depthwise conv (uniform ranks)
    stacked: bool = False  # ... as r true depthwise convs, concatenated (`decompose.stack`)
    measured_ratio: dict[int, float] | None = None  # batch -> layer latency ratio (latency target)
    fold: bool = False  # fold the Gather into the producer (measured faster, latency target)
    reason: str = ""  # why it is left alone ('' = rewrite)


@dataclass
class BudgetPlan:
    """What a budget planner decided beyond the ranks, multipliers, folds and reasons it set on
    the candidates: the budget report, and under target="latency" what the latency planner measured."""

    budget: BudgetReport
    latency: LatencyReport | None = None


def skip_reason(site: ConvSite, first: bool, selection: SelectionOptions) -> str:
    """Why a conv is not a candidate ('' if it is)."""
    if selection.conv == "off":
        return "the conv pass is off (FC layers only)"
    if site.weight is None:
        return site.weight_source
    if site.kernel_size == 1:
        return "1x1 conv (already pointwise)"
    if site.in_channels // site.group == 1 and site.out_channels // site.group == 1:
        return "depthwise conv (nothing to gain)"
    if first and selection.skip_first:
        return OptionText("first conv ({0} to include)", "skip_first=False")
    return name_filter(site.name, selection) or ""


def skip_reasons(sites: list[ConvSite], selection: SelectionOptions) -> dict[str, str]:
    """conv name -> `skip_reason` ('' for a candidate), the first conv being the first of `sites`."""
    return {s.name: skip_reason(s, i == 0, selection) for i, s in enumerate(sites)}


def name_filter(name: str, selection: SelectionOptions) -> str | None:
    """Why the include/exclude patterns leave the layer `name` alone (None: they select it)."""
    if selection.include is not None and not re.search(selection.include, name):
        return OptionText("not matched by the {0} pattern", "include")
    if selection.exclude is not None and re.search(selection.exclude, name):
        return OptionText("matched by the {0} pattern", "exclude")
    return None
