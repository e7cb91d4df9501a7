"""optimize(conv="ssvd"): the convs as spatial-SVD pairs (peers.SpatialSVDPass) at a MAC budget,
then the same FC, INT8 and verification steps as GDWS; a MAC budget only, no GDWS option."""

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


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_the_same_model_as_the_pass_verified_and_reported():
    model = small_cnn()
    out, report = optimize(model, conv="ssvd", mac_reduction=1.5)
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
    assert d["summary"]["params_before"] is None  # not counted per conv for spatial SVD (not 0)


def test_int8_after_spatial_svd_wraps_every_conv(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((32, 3, 12, 12)).astype(np.float32))
    out, report = optimize(small_cnn(), conv="ssvd", mac_reduction=1.5, quantize="int8", data=str(tmp_path / "x.npz"))
    coverage = int8_coverage(out)
    assert len(coverage.convs) == 5 and len(coverage.wrapped) == 5
    assert report.quantize is not None and report.verification.ran


@pytest.mark.parametrize("options,params", [
    ({}, ("conv=ssvd", "mac_reduction")),
    ({"mac_reduction": 2, "target": "latency"}, ("mac_reduction", "target", "latency_reduction")),
    ({"mac_reduction": 2, "width_multiple": 8}, ("conv=ssvd", "width_multiple")),
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
                                  "--report", str(rep)])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and out.exists(), r.output
    assert "spatial SVD rewrite" in text and "first conv (--no-skip-first to include)" in text
    assert "2/3 rewritten, conv MACs / 1.50" in text
    assert json.loads(rep.read_text())["spatial_svd"]["layers"]
    r = CliRunner().invoke(main, ["optimize", cnn_path, "-o", str(tmp_path / "x.onnx"), "--conv", "ssvd"])
    assert r.exit_code == 2 and "--conv ssvd needs --mac-reduction" in r.output
    assert not (tmp_path / "x.onnx").exists()
