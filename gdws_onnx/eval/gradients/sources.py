"""The gradient sources by name: which exist, which are installed, and building one."""

from __future__ import annotations

import importlib.util
import sys

import onnx

from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.gradients.onnx_ad_source import OnnxADSource
from gdws_onnx.eval.gradients.protocol import GradientSource
from gdws_onnx.eval.gradients.torch_source import TorchSource

SOURCES = ("torch", "onnx-ad")
# Chosen by measurement (tools/compare_gradient_sources.py, tests/test_validation.py): onnx-ad
# 0.3.0 is 1.3-1.7x faster on CPU but returns wrong input gradients for Conv with asymmetric
# pads, refuses auto_pad, and its Gather backward (ScatterND reduction=add over the duplicate
# indices every GDWS layer has) races in ORT's thread pool unless run on one thread. The torch
# replica is exact on all of these; onnx-ad stays as the no-torch fallback and cross-check.
DEFAULT_SOURCE = "torch"
# The package each source imports, and how to install it.
SOURCE_PACKAGES = {"torch": ("torch", "pip install torch==2.13.0"),
                   "onnx-ad": ("onnx_ad", "pip install onnx-ad==0.3.0")}


def package_installed(package: str) -> bool:
    """Whether `import package` can work, found without importing it (instant). A module set to
    None in sys.modules (Python's marker for a blocked import) counts as missing."""
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def installed_sources() -> tuple[str, ...]:
    """The gradient sources whose package is installed (instant: nothing is imported)."""
    return tuple(s for s in SOURCES if package_installed(SOURCE_PACKAGES[s][0]))


def make_source(model: onnx.ModelProto, name: str = DEFAULT_SOURCE, batch_size: int = 64,
                threads: int | None = None) -> GradientSource:
    """Build the named gradient source ('onnx-ad' or 'torch'); GDWSError when it cannot."""
    if name == "onnx-ad":
        return OnnxADSource(model, batch_size=batch_size, threads=threads)
    if name == "torch":
        return TorchSource(model, batch_size=batch_size, threads=threads)
    raise GDWSError(f"unknown gradient source {name!r} (choose from {', '.join(SOURCES)})")
