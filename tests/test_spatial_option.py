"""optimize(conv="ssvd"): the convs as spatial-SVD pairs (peers.SpatialSVDPass) at a MAC budget or
a per-layer error budget, then the same FC, INT8 and verification steps as GDWS; no GDWS option."""

import json

import numpy as np
import onnx
import pytest
from builders import small_cnn
from click.testing import CliRunner

from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.errors import OptionError
from gdws_onnx.graph.qdq import int8_coverage
from gdws_onnx.peers import SpatialSVDPass


def _conv_params(model: onnx.ModelProto) -> int:
    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(inits[name] for n in model.graph.node if n.op_type == "Conv" for name in n.input[1:] if name)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_the_same_model_as_the_pass_verified_and_reported():
    model = small_cnn()
    out, report = optimize(model, conv="ssvd", mac_reduction=1.5, target="macs")
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    expected = SpatialSVDPass(mac_reduction=1.5).call(copy).model
    assert out.graph == expected.graph  # the pass itself (its exactness: tests/test_peers.py)
    assert _ops(model).count("Conv") == 3 and _ops(out).count("Conv") == 5  # two convs became pairs
    assert report.budget.mode == "macs" and report.budget.met and report.mac_reduction >= 1.5 - 1e-9
    assert report.budget.achieved == pytest.approx(report.mac_reduction)
    layers = {layer["name"]: layer for layer in report.spatial_svd["layers"]}
    assert layers["conv0"]["status"] == "skipped" and layers["conv0"]["reason"] == "first conv (skip_first=False to include)"
    assert {n for n, layer in layers.items() if layer["status"] == "rewritten"} == {"conv1", "conv2"}
    assert report.layers == [] and report.verification.ran and report.verification.passed
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert out.ir_version == model.ir_version
    d = json.loads(report.to_json())
    assert d["spatial_svd"]["mac_reduction"] == pytest.approx(report.mac_reduction)
    assert d["summary"]["mac_reduction"] == pytest.approx(report.mac_reduction)
    # conv parameters as counted in the graphs: each Conv's weight and bias initializers
    assert d["summary"]["params_before"] == _conv_params(model)
    assert d["summary"]["params_after"] == _conv_params(out) < _conv_params(model)


def test_int8_after_spatial_svd_wraps_every_conv(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((32, 3, 12, 12)).astype(np.float32))
    out, report = optimize(small_cnn(), conv="ssvd", mac_reduction=1.5, quantize="int8", data=str(tmp_path / "x.npz"), target="macs",
                           mixed_precision=False)
    coverage = int8_coverage(out)
    assert len(coverage.convs) == 5 and len(coverage.wrapped) == 5
    assert report.quantize is not None and report.verification.ran


@pytest.mark.parametrize("options,params", [
    ({"uniform_rank": 2}, ("conv=ssvd", "uniform_rank")),
    ({"mac_reduction": 2, "target": "latency"}, ("mac_reduction", "target", "latency_reduction")),
    ({"width_multiple": 8, "target": "latency"}, ("conv=ssvd", "width_multiple")),
    ({"mac_reduction": 2, "include": "conv1"}, ("conv=ssvd", "include")),
    ({"mac_reduction": 2, "bias_correction": True, "data": "x.npz"}, ("conv=ssvd", "bias_correction")),
])
def test_gdws_options_are_refused_naming_both(options, params):
    with pytest.raises(OptionError) as e:
        optimize(small_cnn(), conv="ssvd", **options)
    assert e.value.params == params


def test_cli(tmp_path, cnn_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["optimize", cnn_path, "-o", str(out), "--conv", "ssvd", "--mac-reduction", "1.5",
                                  "--report", str(rep), "--target", "macs"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and out.exists(), r.output
    assert "spatial SVD rewrite" in text and "first conv (--no-skip-first to include)" in text
    assert "2/3 rewritten, conv MACs / 1.50" in text
    assert json.loads(rep.read_text())["spatial_svd"]["layers"]
    r = CliRunner().invoke(main, ["optimize", cnn_path, "-o", str(tmp_path / "x.onnx"), "--conv", "ssvd",
                                  "--width-multiple", "8", "--target", "latency"])
    assert r.exit_code == 2 and "--conv ssvd cannot go with --width-multiple" in r.output
    assert not (tmp_path / "x.onnx").exists()
    r = CliRunner().invoke(main, ["optimize", cnn_path, "-o", str(tmp_path / "w.onnx"), "--conv", "ssvd",
                                  "--mac-reduction", "1.5", "--width-multiple", "8", "--target", "macs",
                                  "--report", str(rep)])
    assert r.exit_code == 0, r.output
    ranks = [x["rank"] for x in json.loads(rep.read_text())["spatial_svd"]["layers"] if x["status"] == "rewritten"]
    assert ranks and all(rank % 8 == 0 for rank in ranks)


def test_error_budget_per_layer_and_as_inspect_promised(tmp_path):
    """At an error budget each rewritten layer keeps the lowest rank within it (the pass with
    error_budget), the default budget is GDWS's, and the whole-model MAC cut is inspect's."""
    from gdws_onnx.pipeline.inspection import inspect_model, model_cut
    from gdws_onnx.pipeline.options import DEFAULT_ERROR_BUDGET

    path = str(tmp_path / "cnn.onnx")
    onnx.save(small_cnn(seed=3, channels=(16, 32, 32)), path)
    for eps in (0.2, 0.4):
        out, report = optimize(path, conv="ssvd", error_budget=eps, skip_first=False, target="macs")
        expected = SpatialSVDPass(error_budget=eps, skip_first=False).call(onnx.load(path)).model
        assert out.graph == expected.graph and report.verification.passed
        rewritten = [x for x in report.spatial_svd["layers"] if x["status"] == "rewritten"]
        assert rewritten and all(x["relative_error"] <= eps for x in rewritten)
        assert all(x["rank"] == 1 or x["relative_error"] > 0 for x in rewritten)
        assert report.budget.mode == "error" and report.budget.target == eps
        assert report.budget.achieved == pytest.approx(max(x["relative_error"] for x in rewritten))
        assert report.mac_reduction == pytest.approx(model_cut(inspect_model(path, error=eps), "spatial_svd"))
    _, default = optimize(path, conv="ssvd", verify=False, target="macs")
    assert default.budget.mode == "error" and default.budget.target == DEFAULT_ERROR_BUDGET
