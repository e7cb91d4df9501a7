"""`optimize --fc kronecker|lowrank`: the FC rewrite inside the pipeline (report, verification, CLI)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gdws_onnx import optimize
from gdws_onnx.cli import main


def mlp(seed: int = 0, widths=(64, 96, 48, 10)) -> onnx.ModelProto:
    """A Conv-free MLP: Gemm (transB) -> Relu -> MatMul + Add -> Relu -> Gemm, weights of rank >= 8."""
    rng = np.random.default_rng(seed)
    w = [(rng.standard_normal((widths[i + 1], widths[i])) / np.sqrt(widths[i])).astype(np.float32)
         for i in range(3)]
    inits = [numpy_helper.from_array(w[0], "w0"), numpy_helper.from_array(np.zeros(widths[1], np.float32), "b0"),
             numpy_helper.from_array(w[1].T.copy(), "w1"), numpy_helper.from_array(np.ones(widths[2], np.float32), "b1"),
             numpy_helper.from_array(w[2], "w2"), numpy_helper.from_array(np.zeros(widths[3], np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h0"], name="fc0", transB=1),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["h1"], name="bias1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", widths[3]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("scheme", ["kronecker", "lowrank"])
def test_conv_free_model_is_a_target_and_exact_at_zero_error(scheme):
    model = mlp()
    out, report = optimize(model, fc=scheme, error_budget=0.0, force=True, input_shapes={"x": [4, 64]}, target="macs")
    assert report.fc is not None and report.fc.layers, report.fc
    assert report.layers == []  # no conv
    assert report.fc.skipped == []  # force: fc2 too, under min_weight, and the layers not cheaper than dense
    assert {layer.name for layer in report.fc.layers} == {"fc0", "fc1", "fc2"}
    assert report.verification.ran and report.verification.outputs[0].relative < 1e-5
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_allclose(logits(out, x), logits(model, x), rtol=1e-4, atol=1e-5)
    assert out.ir_version == model.ir_version and out.opset_import == model.opset_import


def test_budget_cuts_parameters_and_error_is_reported():
    out, report = optimize(mlp(), fc="lowrank", error_budget=0.3, input_shapes={"x": [4, 64]}, target="macs")
    fc = report.fc
    assert fc.params_after < fc.params_before
    assert all(layer.error <= 0.3 + 1e-9 for layer in fc.layers)
    d = report.to_dict()["fc"]
    assert d["scheme"] == "lowrank" and d["params_after"] == fc.params_after
    assert report.verification.ran  # the rewritten model was compared in ORT
    assert report.verification.outputs[0].relative > 1e-4  # truncation shows at the output


def test_fc_off_leaves_gemm_alone_and_no_conv_model_is_unchanged(runner, tmp_path):
    src, dst = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), src)
    r = runner.invoke(main, ["optimize", str(src), "-o", str(dst), "--target", "macs"])
    assert r.exit_code == 0, r.output
    assert onnx.load(str(dst)).graph.node == onnx.load(str(src)).graph.node


def test_cli_fc_rows_report_and_bad_combinations(runner, tmp_path):
    src, dst, rep = tmp_path / "mlp.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(mlp(), src)
    r = runner.invoke(main, ["optimize", str(src), "-o", str(dst), "--fc", "kronecker", "--error-budget", "0.2",
                             "--report", str(rep), "--target", "macs"])
    assert r.exit_code == 0, r.output
    assert "fc fc0:" in r.output and "layers rewritten" in r.output
    assert "fc fc2: skipped: the weight has 480 elements, fewer than min_weight=1024 (--force overrides it)" in r.output
    assert json.loads(rep.read_text())["fc"]["scheme"] == "kronecker"
    bad = runner.invoke(main, ["optimize", str(src), "-o", str(tmp_path / "x.onnx"), "--fc", "lowrank",
                               "--uniform-rank", "2", "--target", "macs"])
    assert bad.exit_code == 2 and "--fc" in bad.output and "--uniform-rank" in bad.output
    assert not (tmp_path / "x.onnx").exists()


def test_cli_prints_no_conv_table_for_a_model_without_convs(runner, tmp_path, cnn_path):
    src, dst = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), src)
    r = runner.invoke(main, ["optimize", str(src), "-o", str(dst), "--fc", "lowrank", "--force", "--target", "macs"])
    assert r.exit_code == 0, r.output
    assert "GDWS rewrite" not in r.output and "skipped" not in r.output
    assert "fc fc0:" in r.output and "fc fc2:" in r.output  # every FC layer forced, fc2 under min_weight too
    with_convs = runner.invoke(main, ["optimize", cnn_path, "-o", str(tmp_path / "cnn_out.onnx"), "--target", "macs"])
    assert with_convs.exit_code == 0 and "GDWS rewrite" in with_convs.output, with_convs.output


def test_latency_timing_sets_the_batch_of_a_transposed_input_on_its_last_axis():
    from gdws_onnx.pipeline.fc_latency import at_batch, timeable

    assert at_batch([5, 64], 8) == [8, 64] and at_batch([64, 5], 8, -1) == [64, 8] and at_batch([64], 8) == [64]
    assert timeable([None, 64], 2) and not timeable([64, None], 2)
    assert timeable([64, None], 2, -1) and not timeable([None, 5], 2, -1)


def test_conv_off_rewrites_fc_only_and_says_the_budget_went_to_fc(cnn_path):
    from builders import small_cnn

    model = small_cnn(seed=0)
    out, report = optimize(model, conv="off", fc="lowrank", error_budget=0.2, force=True, verify=False, target="macs")
    assert not report.rewritten and all("conv pass is off" in layer.reason for layer in report.layers)
    assert sum(n.op_type == "Conv" for n in out.graph.node) == sum(n.op_type == "Conv" for n in model.graph.node)
    assert "FC layers" in report.budget.message
    with pytest.raises(Exception, match="conv must be one of auto, gdws, ssvd, off, got 'dense'"):
        optimize(model, conv="dense", target="macs")


def test_exclude_keeps_an_fc_layer_dense_with_the_reason():
    out, report = optimize(mlp(), fc="lowrank", error_budget=0.0, force=True, exclude="^fc1$",
                           input_shapes={"x": [4, 64]}, target="macs")
    assert ("fc1", "matched by the exclude pattern") in report.fc.skipped
    assert "fc1" not in {layer.name for layer in report.fc.layers} and "fc0" in {l.name for l in report.fc.layers}
    assert any(n.name == "fc1" and n.op_type == "MatMul" for n in out.graph.node)
