"""onnx-gdws: post-training Generalized Depthwise-Separable rewriting of ONNX Conv layers.

The public names below are imported on first use (PEP 562), so that `import gdws_onnx.decompose`
or the CLI's start-up does not load ONNX Runtime, SciPy's statistics or the attack code."""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {  # public name -> the submodule that defines it
    "GDWSError": "errors", "GateFailed": "errors",
    "inspect_model": "inspect",
    "optimize": "optimize", "OptimizeOptions": "optimize",
    "validate": "validation", "ValidateOptions": "validation", "ValidationReport": "validation",
}

__all__ = ["optimize", "OptimizeOptions", "inspect_model", "validate", "ValidateOptions", "ValidationReport",
           "GDWSError", "GateFailed", "__version__"]


def __getattr__(name: str):
    """Import the submodule that defines a public name on first access and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """This package's module type. Importing a submodule binds it on its parent, and the submodule
    `optimize` shares its name with the function `optimize`: keep the function bound, as the eager
    `from .optimize import optimize` did (whichever is imported first)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
