"""Provenance of results: the software versions a result depends on, and JSON for numpy values."""

from __future__ import annotations

import platform


def versions() -> dict[str, str | None]:
    """Versions of everything a result depends on (None for an optional package not installed)."""
    from importlib import metadata

    from gdws_onnx import __version__

    out: dict[str, str | None] = {"onnx-gdws": __version__, "python": platform.python_version(),
                                  "machine": platform.machine(),
                                  "processor": platform.processor() or platform.machine()}
    for dist in ("onnx", "onnxruntime", "numpy", "scipy", "onnx-ad", "torch", "torchattacks"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def json_default(o):
    """json.dumps `default` for numpy scalars and arrays."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
