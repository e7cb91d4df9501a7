"""Sweeps: GDWS at a ladder of budgets beside its peers, each point measured the same way
(`run.py`), and the report with its Pareto plots (`report.py`)."""

from gdws_onnx.sweep.run import SweepOptions, sweep

__all__ = ["SweepOptions", "sweep"]
