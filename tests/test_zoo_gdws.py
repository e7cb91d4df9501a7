"""End to end on the shipped robust model: GDWS at full rank is exact, and at a small error
budget it keeps clean and robust accuracy (white-box PGD on each model, scored in ORT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from gdws_onnx import optimize, validate
from gdws_onnx.runtime.session import make_session

VGG = Path(__file__).resolve().parents[1] / "models" / "vgg_small_fgsm.onnx"
RESNET = VGG.with_name("resnet18_small_fgsm.onnx")
pytestmark = pytest.mark.skipif(not VGG.is_file(), reason="models/vgg_small_fgsm.onnx not present")


@pytest.fixture(scope="module")
def data(fashion_mnist):
    from validate_helpers import fashion

    return fashion(100)


@pytest.mark.parametrize("path,convs", [(VGG, 7), (RESNET, 17)], ids=["vgg", "resnet"])  # 20 convs, 3 are 1x1 shortcuts
def test_full_rank_rewrite_of_zoo_model_is_exact(data, path, convs):
    if not path.is_file():
        pytest.skip(f"{path.name} not present")
    model = onnx.load(str(path))
    out, rep = optimize(model, error_budget=0.0, force=True, skip_first=False, verify=False, target="macs")
    assert len(rep.rewritten) == convs
    x = data[0]
    ref = make_session(model).run(None, {"input": x})[0]
    new = make_session(out).run(None, {"input": x})[0]
    assert np.abs(new - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_small_error_budget_keeps_robustness(data):
    pytest.importorskip("torch")
    model = onnx.load(str(VGG))
    out, rep = optimize(model, error_budget=0.05, target="macs")
    assert len(rep.rewritten) == 6 and all(lay.relative_error <= 0.05 + 1e-9 for lay in rep.rewritten)
    assert rep.mac_reduction > 1
    v = rep.verification  # measured in ORT on random inputs (`passed` is only a gate with max_error)
    assert v.ran and not v.vacuous and v.outputs[0].relative < 0.15
    x, y = data
    ref, new = (make_session(m).run(None, {"input": x})[0] for m in (model, out))
    assert np.linalg.norm(new - ref) / np.linalg.norm(ref) < 0.15  # on real images: about 0.10 (0.22 at 0.1)
    r = validate(model, out, x=x, y=y, eps=0.1, steps=5)
    assert r.original.clean_accuracy > 0.8 and r.original.robust_accuracy > 0.6  # it is a robust model
    assert r.agreement >= 0.97
    assert r.clean_drop_pp <= 3.0 and r.robust_drop_pp <= 5.0


def test_optimize_verifies_on_a_data_set_spec(tmp_path, fashion_mnist):
    """--data accepts the data set specs validate uses; a bad spec is exit 2 with no output."""
    from click.testing import CliRunner

    from gdws_onnx.cli import main

    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["optimize", str(VGG), "-o", str(out), "--error-budget", "0.05",
                                  "--data", "fashion-mnist:test", "--report", str(tmp_path / "r.json"), "--target", "macs"])
    assert r.exit_code == 0, r.output
    assert "first 256 samples of fashion-mnist:test" in r.output
    import json

    agreement = json.loads((tmp_path / "r.json").read_text())["verification"]["outputs"][0]["top1_agreement"]
    assert agreement >= 0.97
    bad = tmp_path / "bad.onnx"
    r = CliRunner().invoke(main, ["optimize", str(VGG), "-o", str(bad), "--data", "nope:x", "--target", "macs"])
    assert r.exit_code == 2 and "unknown data set" in r.output and not bad.exists()
