"""Calibration on data: the data-aware truncation metric and bias correction."""
