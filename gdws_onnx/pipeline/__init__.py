"""The user-facing pipelines: optimize (its option groups in options.py, budget planners in budgets.py
and latency.py, candidates in candidates.py), inspection, and their reports."""
