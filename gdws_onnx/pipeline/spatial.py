"""`optimize(conv="ssvd")`: the convs as spatial-SVD pairs instead of GDWS (peers.SpatialSVDPass:
each k_h x k_w conv becomes a k_h x 1 conv to r channels and a 1 x k_w conv, the rank-r truncated
SVD of W reshaped to (C k_h) x (M k_w); ranks allocated across layers by one greedy at conv
MACs / R, or per layer at a relative weight error as GDWS's error budget; with width_multiple m,
every rank a multiple of m). On trained robust
CNNs whose kernels are close to separable this keeps accuracy at far larger MAC cuts than GDWS
(docs/results.md, "Paper width"). The FC rewrite, the INT8 step and the
verification follow as for GDWS.
"""

from __future__ import annotations

import onnx

from gdws_onnx.peers.common import mac_shortfall
from gdws_onnx.peers.spatial_svd import SpatialSVDPass
from gdws_onnx.pipeline.options import OptimizeOptions
from gdws_onnx.pipeline.report import BudgetReport


def rewrite_spatial_svd(model: onnx.ModelProto, opts: OptimizeOptions) -> tuple[BudgetReport, dict]:
    """Rewrite `model` in place at conv MACs / opts.budget.mac_reduction, else at the per-layer
    error budget (`BudgetOptions.error`); returns the budget with what it reached (the MAC ratio;
    the largest rewritten layer's relative error) and the pass's report (peers.PeerReport.to_dict():
    one entry per conv)."""
    common = dict(skip_first=opts.selection.skip_first, force=opts.budget.force,
                  input_shapes=opts.run.input_shapes or None, rank_multiple=opts.budget.width_multiple)
    target = opts.budget.mac_reduction
    if target is None:
        error = opts.budget.error
        report = SpatialSVDPass(error_budget=error, **common).call(model).report
        worst = max((layer.relative_error for layer in report.layers if layer.status == "rewritten"), default=0.0)
        return BudgetReport(mode="error", target=error, achieved=worst), report.to_dict()
    report = SpatialSVDPass(mac_reduction=target, **common).call(model).report
    reached = report.mac_reduction
    budget = BudgetReport(mode="macs", target=target, achieved=reached, met=bool(report.met), message=report.message)
    if not budget.met and not budget.message:
        budget.message = mac_shortfall(reached, target)
    return budget, report.to_dict()
