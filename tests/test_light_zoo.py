"""Every model of the onnx package's bundled light zoo optimizes, passes the checker and runs."""

import os

import numpy as np
import onnx
import pytest
from conftest import LIGHT_ZOO

from gdws_onnx import optimize

MODELS = sorted(f for f in os.listdir(LIGHT_ZOO) if f.endswith(".onnx")) if os.path.isdir(LIGHT_ZOO) else []
SLOW = {"light_vgg19.onnx"}  # seconds where the others take a fraction: left out of `-m "not slow"`


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def test_zoo_is_present():
    assert len(MODELS) >= 9


@pytest.mark.parametrize("name", _params(MODELS))
def test_light_model_optimizes(name):
    path = os.path.join(LIGHT_ZOO, name)
    original = onnx.load(path)
    out, report = optimize(path, error_budget=0.1, target="macs")
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    assert [i.name for i in out.graph.input] == [i.name for i in original.graph.input]
    v = report.verification
    if report.rewritten:
        assert v.ran and all(np.isfinite(o.relative) for o in v.outputs)


@pytest.mark.parametrize("name", _params(["light_vgg19.onnx", "light_resnet50.onnx", "light_inception_v1.onnx"]))
def test_light_model_full_rank_is_exact(name):
    out, report = optimize(os.path.join(LIGHT_ZOO, name), error_budget=0.0, force=True, max_error=1e-5, target="macs")
    assert report.rewritten and report.verification.passed, report.verification.outputs
