"""Numerical core, numpy only: per-channel SVD (decompose), rank allocation (allocate), statistics (stats)."""
