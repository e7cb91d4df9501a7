"""onnx-gdws: post-training Generalized Depthwise-Separable rewriting of ONNX Conv layers."""

__version__ = "0.1.0"

from .errors import GateFailed, GDWSError  # noqa: E402
from .inspect import inspect_model  # noqa: E402
from .optimize import OptimizeOptions, optimize  # noqa: E402
from .validation import ValidateOptions, ValidationReport, validate  # noqa: E402

__all__ = ["optimize", "OptimizeOptions", "inspect_model", "validate", "ValidateOptions", "ValidationReport",
           "GDWSError", "GateFailed", "__version__"]
