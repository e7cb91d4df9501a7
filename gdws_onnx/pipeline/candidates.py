"""A conv the pipeline may rewrite, and the rank plan the budgets fill in.

Shared by the MAC/error planners (`optimize`) and the latency planner (`latency`), so neither
imports the other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gdws_onnx.core import decompose
from gdws_onnx.graph.convs import ConvSite

DEFAULT_ERROR_BUDGET = 0.1  # per-layer relative weighted error when no budget is given


@dataclass
class Candidate:
    """An eligible conv, its per-channel spectrum and weights, and the plan chosen for it."""

    site: ConvSite
    spec: decompose.Spectrum
    alpha: np.ndarray
    ranks: np.ndarray | None = None  # terms per input channel; None = left alone
    multiplier: bool = False  # realize as a channel-multiplier depthwise conv (uniform ranks)
    measured_ratio: dict[int, float] | None = None  # batch -> layer latency ratio (latency target)
    fold: bool = False  # fold the Gather into the producer (measured faster, latency target)
    reason: str = ""  # why it is left alone ('' = rewrite)
