"""The optimize/inspect commands: exit codes, clear errors, no partial files, what is preserved."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import small_cnn
from onnx import helper, numpy_helper

from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.runtime.session import make_session


def _files(folder):
    return sorted(os.listdir(folder))


def _invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_optimize_writes_a_valid_faster_model_and_report(runner, cnn_path, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = _invoke(runner, "optimize", cnn_path, "-o", out, "--error-budget", "0.2", "--report", rep)
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads(rep.read_text())
    assert report["summary"]["rewritten"] == 2  # conv0 is the first conv
    assert report["summary"]["mac_reduction"] > 1
    assert report["verification"]["ran"] and report["verification"]["outputs"][0]["top1_agreement"] is not None
    for layer in report["layers"]:
        assert layer["relative_error"] <= 0.2 + 1e-12
    assert {"onnx", "onnxruntime", "numpy"} <= set(report["versions"])
    assert "rewritten" in r.output and "verified in ONNX Runtime" in r.output
    names = [n.name for n in onnx.load(out).graph.node]
    assert "conv1/gdws/dw" in names and "conv1/gdws/pw" in names


def test_output_is_byte_identical_across_runs(runner, cnn_path, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        assert _invoke(runner, "optimize", cnn_path, "-o", out, "--mac-reduction", "2").exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_preserves_ir_opsets_metadata_and_io(tmp_path):
    model = small_cnn()
    model.ir_version = 7
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model.producer_name, model.producer_version, model.doc_string = "me", "9.9", "doc"
    helper.set_model_props(model, {"author": "x", "license": "y"})
    out, _ = optimize(model, error_budget=0.3, verify=False)
    assert out.ir_version == 7
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 17), ("com.example", 1)]
    assert (out.producer_name, out.producer_version, out.doc_string) == ("me", "9.9", "doc")
    assert {p.key: p.value for p in out.metadata_props} == {"author": "x", "license": "y"}
    assert [i.SerializeToString() for i in out.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in out.graph.output] == [o.SerializeToString() for o in model.graph.output]
    assert model.graph.node[2].op_type == "Conv"  # the caller's model is not modified


def test_external_data_round_trip(runner, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(small_cnn(), src / "m.onnx", save_as_external_data=True, location="m.weights", size_threshold=0)
    dst = tmp_path / "dst"
    dst.mkdir()
    r = _invoke(runner, "optimize", src / "m.onnx", "-o", dst / "o.onnx", "--error-budget", "0.2")
    assert r.exit_code == 0, r.output
    assert _files(dst) == ["o.onnx", "o.onnx.data"]
    m = onnx.load(dst / "o.onnx", load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    x = np.random.default_rng(0).random((2, 3, 12, 12)).astype(np.float32)
    a = make_session(str(src / "m.onnx")).run(None, {"x": x})[0]
    b = make_session(str(dst / "o.onnx")).run(None, {"x": x})[0]
    assert np.allclose(a, b, rtol=0.5, atol=0.5) and a.shape == b.shape


def test_missing_external_data_is_a_clear_error(runner, tmp_path):
    onnx.save(small_cnn(), tmp_path / "m.onnx", save_as_external_data=True, location="m.weights")
    os.remove(tmp_path / "m.weights")
    r = _invoke(runner, "optimize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and "external data file 'm.weights'" in r.output
    assert _files(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("this is not a model\n" * 20), "not"),
    (lambda p: p.write_bytes(small_cnn().SerializeToString()[:700]), "not a valid ONNX model"),
])
def test_bad_model_files(runner, tmp_path, make, needle):
    bad = tmp_path / "bad.onnx"
    make(bad)
    before = _files(tmp_path)
    r = _invoke(runner, "optimize", bad, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2, r.output
    assert needle in r.output and r.output.startswith("error:") and r.output.count("\n") == 1
    assert _files(tmp_path) == before


def test_model_without_conv_is_written_unchanged(runner, tmp_path):
    """Nothing to rewrite is not bad input: exit 0, an unchanged copy, and a note that says so."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(g)
    model.producer_name = "me"
    onnx.save(model, tmp_path / "m.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = _invoke(runner, "optimize", tmp_path / "m.onnx", "-o", out, "--mac-reduction", "2", "--report", rep)
    assert r.exit_code == 0, r.output
    assert "no Conv node" in r.output and "nothing to rewrite" in r.output and "wrote" in r.output
    assert onnx.load(out).SerializeToString() == onnx.load(tmp_path / "m.onnx").SerializeToString()
    report = json.loads(rep.read_text())
    assert report["summary"]["convs"] == 0 and report["budget"]["mode"] == "macs"
    assert "nothing to rewrite" in report["budget"]["message"] and not report["verification"]["ran"]
    r = _invoke(runner, "inspect", tmp_path / "m.onnx")
    assert r.exit_code == 0 and "no Conv node" in r.output
    r = _invoke(runner, "inspect", tmp_path / "m.onnx", "--json")
    assert r.exit_code == 0 and json.loads(r.output) == []


@pytest.mark.parametrize("args,needle", [
    (["--error-budget", "1.5"], "--error-budget must be in [0, 1)"),
    (["--error-budget", "-0.1"], "--error-budget must be in [0, 1)"),
    (["--mac-reduction", "0.5"], "--mac-reduction must be >= 1"),
    (["--mac-reduction", "2", "--error-budget", "0.1"], "not several"),
    (["--input-shape", "x=1,3"], "bad --input-shape"),
    (["--include", "("], "--include is not a valid regular expression"),
    (["--alphas", "nope.json"], "--alphas file not found"),
    (["--error-budget", "abc"], "is not a valid float"),
])
def test_bad_options(runner, cnn_path, tmp_path, args, needle):
    r = _invoke(runner, "optimize", cnn_path, "-o", tmp_path / "o.onnx", *args)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "o.onnx").exists()


def test_unwritable_output_and_input_overwrite(runner, cnn_path, tmp_path):
    r = _invoke(runner, "optimize", cnn_path, "-o", tmp_path / "missing" / "o.onnx")
    assert r.exit_code == 2 and "output folder does not exist" in r.output
    before = open(cnn_path, "rb").read()
    r = _invoke(runner, "optimize", cnn_path, "-o", cnn_path)
    assert r.exit_code == 2 and "refusing to overwrite the input" in r.output
    assert open(cnn_path, "rb").read() == before
    r = _invoke(runner, "optimize", cnn_path, "-o", cnn_path, "--overwrite-input")
    assert r.exit_code == 0 and open(cnn_path, "rb").read() != before


def test_max_error_gate_fails_with_exit_1_and_writes_nothing(runner, cnn_path, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = _invoke(runner, "optimize", cnn_path, "-o", out, "--error-budget", "0.5", "--max-error", "1e-9",
                "--report", rep)
    assert r.exit_code == 1 and "FAIL" in r.output
    assert not out.exists() and json.loads(rep.read_text())["verification"]["passed"] is False
    r = _invoke(runner, "optimize", cnn_path, "-o", out, "--error-budget", "0", "--force", "--max-error", "1e-5")
    assert r.exit_code == 0 and "PASS" in r.output and out.exists()


def test_runtime_weight_is_skipped_not_fatal(tmp_path):
    model = small_cnn()
    g = model.graph
    w = next(t for t in g.initializer if t.name == "w1")
    g.input.append(helper.make_tensor_value_info("w1_in", onnx.TensorProto.FLOAT, list(w.dims)))
    g.node.insert(0, helper.make_node("Identity", ["w1_in"], ["w1_rt"], name="w1_id"))
    for n in g.node:
        if n.name == "conv1":
            n.input[1] = "w1_rt"
    out, report = optimize(model, error_budget=0.3, verify=False)
    reasons = {layer.name: (layer.status, layer.reason) for layer in report.layers}
    assert reasons["conv1"][0] == "skipped" and "computed at run time" in reasons["conv1"][1]
    assert reasons["conv2"][0] == "rewritten"


def test_mac_reduction_meets_the_target_or_says_so(tmp_path):
    _, report = optimize(small_cnn(channels=(16, 32, 32, 32), size=16), mac_reduction=1.5,
                         verify=False)
    assert report.budget.met and report.mac_reduction >= 1.5 * (1 - 1e-3)
    _, report = optimize(small_cnn(), mac_reduction=50, verify=False)
    assert not report.budget.met and "cannot" in report.budget.message


def test_mac_reduction_needs_known_shapes(tmp_path):
    model = small_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(Exception, match="--input-shape"):
        optimize(model, mac_reduction=2, verify=False)
    _, report = optimize(model, mac_reduction=2, verify=False, input_shapes={"x": [1, 3, 12, 12]})
    assert report.mac_reduction is not None


def test_unknown_spatial_dims_skip_verification_with_a_message():
    model = small_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param = "H"
    _, report = optimize(model, error_budget=0.2)
    assert not report.verification.ran and "unknown dimension 2" in report.verification.message


def test_alphas_steer_the_allocation(tmp_path):
    alphas = {"conv1": [0.0] * 4 + [1.0] * 4}
    _, report = optimize(small_cnn(), error_budget=0.05, alphas=alphas, verify=False)
    assert report.layers[1].status == "rewritten"
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"convX": [1.0]}))
    with pytest.raises(Exception, match="not in the model"):
        optimize(small_cnn(), alphas=str(path), verify=False)
    np.savez(tmp_path / "a.npz", conv1=np.ones(3))
    with pytest.raises(Exception, match="must be 1 or 8"):
        optimize(small_cnn(), alphas=str(tmp_path / "a.npz"), verify=False)


def test_zero_alpha_channels_are_dropped_first():
    from gdws_onnx.core import decompose
    from gdws_onnx.graph.convs import find_convs

    model = small_cnn()
    alpha = np.array([0.0] * 4 + [1.0] * 4)
    _, report = optimize(model, error_budget=0.01, alphas={"conv1": alpha}, force=True, verify=False)
    site = find_convs(model)[1]
    spec = decompose.spectrum(site.weight)
    # channels with alpha 0 cost nothing to drop: G counts only the weighted channels' terms
    assert report.layers[1].total_rank <= 4 * spec.max_rank


def test_rank_one_layers_become_plain_dws_without_gather():
    model = small_cnn()
    w = next(t for t in model.graph.initializer if t.name == "w1")
    arr = numpy_helper.to_array(w)
    rank1 = np.einsum("mc,k->mck", arr[:, :, 0, 0], np.arange(1, 10.0)).reshape(arr.shape).astype(np.float32)
    w.CopyFrom(numpy_helper.from_array(rank1, "w1"))
    out, report = optimize(model, error_budget=0.0, include="conv1", verify=True, seed=1)
    ops = [n.op_type for n in out.graph.node]
    assert "Gather" not in ops and report.layers[1].realization == "dw+pw"
    assert report.verification.outputs[0].relative < 1e-5


def test_data_file_drives_verification(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((5, 3, 12, 12)).astype(np.float32))
    _, report = optimize(small_cnn(), error_budget=0.1, data=str(tmp_path / "d.npz"))
    assert report.verification.ran and "d.npz" in report.verification.inputs


def test_inspect_table_and_json(runner, cnn_path):
    r = _invoke(runner, "inspect", cnn_path)
    assert r.exit_code == 0 and "conv1" in r.output and "first conv" in r.output
    r = _invoke(runner, "inspect", cnn_path, "--json")
    infos = json.loads(r.output)
    assert [i["name"] for i in infos] == ["conv0", "conv1", "conv2"]
    assert 0 < infos[1]["energy_kept"]["top1"] <= infos[1]["energy_kept"]["top4"] <= 1


def test_console_script_runs(cnn_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "gdws_onnx", "optimize", cnn_path, "-o", str(tmp_path / "o.onnx"),
                        "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "gdws_onnx", "optimize", "nope.onnx", "-o", "x.onnx"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: no such file: nope.onnx"
