"""Sweeps: GDWS at a ladder of budgets beside its peers (planned in `plan.py`), each point
measured the same way (`run.py`, into `results.py`'s records), and the report with its Pareto
plots (`report.py`)."""

from gdws_onnx.sweep.plan import SweepOptions
from gdws_onnx.sweep.run import sweep

__all__ = ["SweepOptions", "sweep"]
