"""onnx-gdws: post-training Generalized Depthwise-Separable rewriting of ONNX Conv layers.

The public names below are imported on first use (PEP 562), so that `import gdws_onnx.core.decompose`
or the CLI's start-up does not load ONNX Runtime, SciPy's statistics or the attack code."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it
    "GDWSError": "gdws_onnx.errors", "GateFailed": "gdws_onnx.errors",
    "inspect_model": "gdws_onnx.pipeline.inspection",
    "optimize": "gdws_onnx.pipeline.optimize", "OptimizeOptions": "gdws_onnx.pipeline.optimize",
    "validate": "gdws_onnx.eval.validation", "ValidateOptions": "gdws_onnx.eval.validation",
    "ValidationReport": "gdws_onnx.eval.validation",
    "compare_models": "gdws_onnx.runtime.bench",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    """Import the module that defines a public name on first access and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
