"""At full rank GDWS is exact: a seeded corpus of Conv forms, each rewritten with
error budget 0 and --force, must match ONNX Runtime on the original model."""

import numpy as np
import onnx
import pytest
from builders import conv_model, random_case

from gdws_onnx import optimize
from gdws_onnx.runtime.session import make_session

N_CASES = 320
FP32_TOL, FP16_TOL = 1e-4, 1e-2


def _run(model, x):
    return make_session(model).run(None, {"x": x})[0].astype(np.float64)


@pytest.mark.parametrize("seed", range(N_CASES))
def test_full_rank_rewrite_is_exact(seed):
    rng = np.random.default_rng(1000 + seed)
    case = random_case(rng, seed)
    model = conv_model(case)
    optimized, report = optimize(model, error_budget=0.0, force=True, skip_first=False, verify=False, target="macs")
    onnx.checker.check_model(optimized, full_check=True)
    (layer,) = report.layers
    assert layer.status == "rewritten", layer.reason
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("Conv") == 2 and "Cast" not in ops  # the folded weight subgraph is gone
    x = rng.random((2, case.in_channels, *case.spatial)).astype(np.float16 if case.fp16 else np.float32)
    ref, new = _run(model, x), _run(optimized, x)
    assert new.shape == ref.shape
    rel = np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-30)
    assert rel <= (FP16_TOL if case.fp16 else FP32_TOL), (case, rel)


def test_corpus_covers_every_form():
    cases = [random_case(np.random.default_rng(1000 + s), s) for s in range(N_CASES)]
    assert {c.nd for c in cases} == {1, 2, 3}
    assert {c.auto_pad for c in cases} == {"NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"}
    assert {c.weight_source for c in cases} == {"initializer", "constant", "fp16_cast"}
    assert any(c.group > 1 for c in cases) and any(c.fp16 for c in cases)
    assert any(max(c.dilations) > 1 for c in cases) and any(max(c.strides) > 1 for c in cases)
    assert any(c.bias for c in cases) and any(not c.bias for c in cases)
    assert any(c.dynamic_batch for c in cases)
    assert any(c.kernel[0] != c.kernel[-1] for c in cases if c.nd > 1)  # non-square kernels
    assert any(c.out_channels // c.group < np.prod(c.kernel) for c in cases)  # M/g < K
    assert any(c.in_channels == c.group for c in cases)  # C/g = 1 with M/g > 1
