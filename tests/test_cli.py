"""The optimize/inspect commands: exit codes, clear errors, no partial files, what is preserved."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import annotated_cnn, assert_model_info_kept, small_cnn
from onnx import helper, numpy_helper

from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.graph.pattern import find_gdws_layers
from gdws_onnx.runtime.session import make_session


def _files(folder):
    return sorted(os.listdir(folder))


def _invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def _conv_macs(model: onnx.ModelProto, pixels: int) -> int:
    """Conv MACs per sample counted from the weights alone: every Conv of these models keeps the
    12x12 plane, so a Conv costs (its weight's elements) x (output pixels)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes[n.input[1]] for n in model.graph.node if n.op_type == "Conv") * pixels


def test_optimize_writes_a_valid_model_with_fewer_macs_and_its_report(runner, cnn_path, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = _invoke(runner, "optimize", cnn_path, "-o", out, "--error-budget", "0.2", "--report", rep, "--target", "macs")
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads(rep.read_text())
    assert report["summary"]["rewritten"] == 2  # conv0 is the first conv
    # the MACs the report claims are those of the written file, counted independently here
    before, after = _conv_macs(onnx.load(cnn_path), 144), _conv_macs(onnx.load(out), 144)
    assert (report["summary"]["conv_macs_before"], report["summary"]["conv_macs_after"]) == (before, after)
    assert after < before and report["summary"]["mac_reduction"] == pytest.approx(before / after)
    assert report["verification"]["ran"] and report["verification"]["outputs"][0]["top1_agreement"] is not None
    for layer in report["layers"]:
        assert layer["relative_error"] <= 0.2 + 1e-12
    assert {"onnx", "onnxruntime", "numpy"} <= set(report["versions"])
    assert "rewritten" in r.output and "verified in ONNX Runtime" in r.output
    assert "conv1" in {g.layer for g in find_gdws_layers(onnx.load(out).graph)}  # its dw -> pw chain


def test_output_is_byte_identical_across_runs(runner, cnn_path, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        assert _invoke(runner, "optimize", cnn_path, "-o", out, "--mac-reduction", "2").exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_preserves_ir_opsets_metadata_and_io(tmp_path):
    model = annotated_cnn()
    out, _ = optimize(model, error_budget=0.3, verify=False, target="macs")
    assert out.ir_version == 7 and [o.domain for o in out.opset_import] == ["", "com.example"]
    assert_model_info_kept(out, model)
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


@pytest.mark.parametrize("options,python,args,cli", [
    ({"error_budget": 1.5}, "error_budget must be in [0, 1)", ["--error-budget", "1.5"],
     "--error-budget must be in [0, 1)"),
    ({"target": "latency", "runs": 2}, "batches needs positive sizes and runs at least 3",
     ["--target", "latency", "--runs", "2"], "--batch needs positive sizes and --runs at least 3"),
    ({"bias_correction": True}, "bias_correction needs data", ["--bias-correction"], "--bias-correction needs --data"),
    ({"alphas": "a{1}.json"}, "alphas file not found: a{1}.json", ["--alphas", "a{1}.json"],
     "--alphas file not found: a{1}.json"),
])
def test_option_errors_name_the_parameter_in_python_and_the_flag_in_the_cli(runner, cnn_path, tmp_path, options,
                                                                            python, args, cli):
    from gdws_onnx.errors import OptionError

    with pytest.raises(OptionError) as e:
        optimize(cnn_path, **options)
    assert str(e.value).startswith(python) and "--" not in str(e.value)
    r = _invoke(runner, "optimize", cnn_path, "-o", tmp_path / "o.onnx", *args)
    assert r.exit_code == 2 and r.output.startswith(f"error: {cli}"), r.output


@pytest.mark.parametrize("param,flag", [
    ("error_budget", "--error-budget"), ("batches", "--batch"), ("skip_first=False", "--no-skip-first"),
    ("force=True", "--force"), ("conv=off", "--conv off"),
])
def test_flag_of_names_a_parameter_and_a_parameter_setting(param, flag):
    from gdws_onnx.cli.common import flag_of

    assert flag_of(param) == flag


def test_skip_reasons_name_the_parameter_in_python_and_the_flag_in_the_cli(runner, cnn_path, tmp_path):
    _, rep = optimize(cnn_path, exclude="conv2", verify=False, target="macs")
    reasons = {layer.name: layer.reason for layer in rep.layers if layer.status != "rewritten"}
    assert reasons["conv0"] == "first conv (skip_first=False to include)"
    assert reasons["conv2"] == "matched by the exclude pattern"
    r = _invoke(runner, "optimize", cnn_path, "-o", tmp_path / "o.onnx", "--exclude", "conv2", "--no-verify")
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "first conv (--no-skip-first to include)" in text, r.output
    assert "matched by the --exclude pattern" in text


@pytest.mark.parametrize("args,needle", [
    (["bench", "{model}", "--batch", "0"], "--batch takes positive integers"),
    (["bench", "{model}", "--ep", "tpu"], "unknown execution provider(s) ['tpu']"),
    (["optimize", "{model}", "-o", "{out}", "--batch", "1,x", "--target", "macs"], "--batch takes comma-separated integers"),
    (["inspect", "{model}", "--input-shape", "x=1"], "bad --input-shape 'x=1'"),
])
def test_shared_options_are_parsed_under_the_error_handler(runner, cnn_path, tmp_path, args, needle):
    """The option groups of cli/args.py parse inside handle_errors: one 'error:' line, exit 2."""
    r = _invoke(runner, *(a.format(model=cnn_path, out=tmp_path / "o.onnx") for a in args))
    assert r.exit_code == 2 and r.output.startswith("error:") and needle in r.output, r.output
    assert r.output.count("\n") == 1 and not (tmp_path / "o.onnx").exists()


def test_unwritable_output_and_input_overwrite(runner, cnn_path, tmp_path):
    r = _invoke(runner, "optimize", cnn_path, "-o", tmp_path / "missing" / "o.onnx")
    assert r.exit_code == 2 and "output folder does not exist" in r.output
    before = open(cnn_path, "rb").read()
    r = _invoke(runner, "optimize", cnn_path, "-o", cnn_path)
    assert r.exit_code == 2 and "refusing to overwrite the input" in r.output
    assert open(cnn_path, "rb").read() == before
    r = _invoke(runner, "optimize", cnn_path, "-o", cnn_path, "--overwrite-input", "--target", "macs")
    assert r.exit_code == 0 and open(cnn_path, "rb").read() != before


def test_max_error_gate_fails_with_exit_1_and_writes_nothing(runner, cnn_path, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = _invoke(runner, "optimize", cnn_path, "-o", out, "--error-budget", "0.5", "--max-error", "1e-9",
                "--report", rep, "--target", "macs")
    assert r.exit_code == 1 and "FAIL" in r.output
    assert not out.exists() and json.loads(rep.read_text())["verification"]["passed"] is False
    r = _invoke(runner, "optimize", cnn_path, "-o", out, "--error-budget", "0", "--force", "--max-error", "1e-5", "--target", "macs")
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
    out, report = optimize(model, error_budget=0.3, verify=False, target="macs")
    reasons = {layer.name: (layer.status, layer.reason) for layer in report.layers}
    assert reasons["conv1"][0] == "skipped" and "computed at run time" in reasons["conv1"][1]
    assert reasons["conv2"][0] == "rewritten"


def test_mac_reduction_meets_the_target_or_says_so(tmp_path):
    _, report = optimize(small_cnn(channels=(16, 32, 32, 32), size=16), mac_reduction=1.5,
                         verify=False, target="macs")
    assert report.budget.met and report.mac_reduction >= 1.5 * (1 - 1e-3)
    _, report = optimize(small_cnn(), mac_reduction=50, verify=False, target="macs")
    assert not report.budget.met and "cannot" in report.budget.message


def test_mac_reduction_needs_known_shapes(tmp_path):
    model = small_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(Exception, match="input_shapes"):  # the parameter, not the CLI flag
        optimize(model, mac_reduction=2, verify=False, target="macs")
    _, report = optimize(model, mac_reduction=2, verify=False, input_shapes={"x": [1, 3, 12, 12]}, target="macs")
    assert report.mac_reduction is not None


def test_unknown_spatial_dims_skip_verification_with_a_message():
    model = small_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param = "H"
    _, report = optimize(model, error_budget=0.2, target="macs")
    assert not report.verification.ran and "unknown dimension 2" in report.verification.message


def _terms_and_weight(model: onnx.ModelProto, layer: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """From a written model: the number of GDWS terms each input channel of `layer` got, and the
    conv weight its Gather -> depthwise -> pointwise chain computes (groups = 1)."""
    from gdws_onnx.graph.pattern import find_gdws_layers

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    chain = next(c for c in find_gdws_layers(model.graph) if c.layer == layer)
    dw, pw = inits[chain.depthwise.input[1]], inits[chain.pointwise.input[1]][:, :, 0, 0]
    source = (inits[chain.gather.input[1]] if chain.gather is not None
              else np.arange(dw.shape[0]) // (dw.shape[0] // channels))  # term g reads this input channel
    weight = np.zeros((pw.shape[0], channels, *dw.shape[2:]))
    for g, c in enumerate(source):
        weight[:, c] += pw[:, g, None, None] * dw[g, 0]
    return np.bincount(source, minlength=channels), weight


def test_alphas_steer_the_allocation(tmp_path):
    """Per-channel weights move terms between channels: the weighted error meets the budget, and
    channels weighted 100x less lose all their terms (without alphas every channel keeps some)."""
    model, budget = small_cnn(), 0.2
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1")).astype(np.float64)
    plain, _ = optimize(model, error_budget=budget, force=True, verify=False, target="macs")
    terms, _ = _terms_and_weight(plain, "conv1", 8)
    assert (terms > 0).all()
    for heavy in (slice(0, 4), slice(4, 8)):
        alpha = np.ones(8)
        alpha[heavy] = 100.0
        out, report = optimize(model, error_budget=budget, alphas={"conv1": alpha}, force=True, verify=False, target="macs")
        terms, q = _terms_and_weight(out, "conv1", 8)
        light = np.ones(8, bool)
        light[heavy] = False
        assert (terms[light] == 0).all() and (terms[heavy] > 0).all(), terms
        per_channel = ((w - q) ** 2).sum(axis=(0, 2, 3)), (w ** 2).sum(axis=(0, 2, 3))
        weighted = (alpha * per_channel[0]).sum() / (alpha * per_channel[1]).sum()
        assert weighted <= budget + 1e-6 and report.layers[1].relative_error == pytest.approx(weighted, rel=1e-4)
        assert per_channel[0].sum() / per_channel[1].sum() > budget  # unweighted, the budget is exceeded
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"convX": [1.0]}))
    with pytest.raises(Exception, match="not in the model"):
        optimize(small_cnn(), alphas=str(path), verify=False, target="macs")
    np.savez(tmp_path / "a.npz", conv1=np.ones(3))
    with pytest.raises(Exception, match="must be 1 or 8"):
        optimize(small_cnn(), alphas=str(tmp_path / "a.npz"), verify=False, target="macs")


def test_zero_alpha_channels_are_dropped_first():
    from gdws_onnx.core import decompose
    from gdws_onnx.graph.convs import find_convs

    model = small_cnn()
    alpha = np.array([0.0] * 4 + [1.0] * 4)
    _, report = optimize(model, error_budget=0.01, alphas={"conv1": alpha}, force=True, verify=False, target="macs")
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
    out, report = optimize(model, error_budget=0.0, include="conv1", verify=True, seed=1, target="macs")
    ops = [n.op_type for n in out.graph.node]
    assert "Gather" not in ops and report.layers[1].realization == "dw+pw"
    assert report.verification.outputs[0].relative < 1e-5


def test_data_file_drives_verification(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((5, 3, 12, 12)).astype(np.float32))
    _, report = optimize(small_cnn(), error_budget=0.1, data=str(tmp_path / "d.npz"), target="macs")
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
