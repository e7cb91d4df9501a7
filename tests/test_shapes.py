"""Conv output sizes that static shape inference cannot see: constant folding, then one ORT run."""

import json

import onnx
import pytest
from builders import padded_cnn
from click.testing import CliRunner

from gdws_onnx import GDWSError, optimize
from gdws_onnx.cli import main
from gdws_onnx.graph.convs import find_convs, fold_small_constants, infer_shapes
from gdws_onnx.runtime.session import probe_shapes

SHAPE = {"x": [1, 1, 28, 28]}


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_torch_pad_subgraph_is_folded():
    model = padded_cnn("constants")
    assert infer_shapes(model, SHAPE)["c0"][2:] == [None, None]  # what static inference sees
    assert list(fold_small_constants(model)["pads"]) == [0, 0, 2, 2, 0, 0, 2, 2]
    sites = find_convs(model, "", SHAPE)  # no probe needed: folding is enough
    assert [s.out_spatial for s in sites] == [(30, 30)] * 3 and not any(s.shape_note for s in sites)


def test_folding_leaves_the_model_alone():
    model = padded_cnn("constants")
    before = model.SerializeToString()
    find_convs(model, "", SHAPE)
    assert model.SerializeToString() == before


def test_run_time_pads_come_from_one_ort_run():
    model = padded_cnn("input_shape", size=30)  # pads = 30 mod 4 = 2 after H and W
    assert [s.out_spatial for s in find_convs(model, "", None)] == [None] * 3
    sites = find_convs(model, "", None, shape_probe=lambda names: probe_shapes(model, names))
    assert [s.out_spatial for s in sites] == [(30, 30)] * 3


def test_inspect_and_mac_reduction_with_given_input_shape(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(padded_cnn("constants", dynamic_hw=True), path)
    r = _invoke("inspect", path, "--input-shape", "x:1,1,28,28", "--json")
    assert r.exit_code == 0, r.output
    assert [i["macs"] for i in json.loads(r.output)] == [30 * 30 * 4 * 9, 30 * 30 * 8 * 4 * 9, 30 * 30 * 8 * 8 * 9]
    r = _invoke("optimize", path, "-o", tmp_path / "o.onnx", "--mac-reduction", "1.5", "--no-skip-first",
                "--input-shape", "x:1,1,28,28", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["mac_reduction"] >= 1.5 * (1 - 1e-3)


def test_run_time_pads_through_the_pipeline():
    _, report = optimize(padded_cnn("input_shape", size=30), mac_reduction=1.5, skip_first=False, verify=False, target="macs")
    assert report.mac_reduction >= 1.5 * (1 - 1e-3) and [layer.pixels for layer in report.layers] == [900] * 3


def test_unknown_input_dims_ask_for_the_flag():
    model = padded_cnn("input_shape", dynamic_hw=True)
    with pytest.raises(GDWSError, match=r"input_shapes x:\?,1,\?,\?"):  # the parameter, not the CLI flag
        optimize(model, mac_reduction=2, verify=False, target="macs")


def test_error_does_not_ask_for_a_flag_that_was_given(tmp_path):
    """Neither inference nor ORT can see through a custom op: the error says why, not 'give --input-shape'."""
    path = tmp_path / "m.onnx"
    onnx.save(padded_cnn("constants", opaque=True), path)
    r = _invoke("optimize", path, "-o", tmp_path / "o.onnx", "--mac-reduction", "2", "--input-shape", "x:1,1,28,28")
    assert r.exit_code == 2 and "output size" in r.output and "ONNX Runtime cannot load" in r.output, r.output
    assert "give" not in r.output and not (tmp_path / "o.onnx").exists()
    r = _invoke("inspect", path, "--input-shape", "x:1,1,28,28", "--json")
    assert r.exit_code == 0 and all(i["macs"] is None for i in json.loads(r.output))
