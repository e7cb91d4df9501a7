"""`optimize(bias_correction=True)`: each rewritten conv's bias absorbs its mean output error on the
calibration data, measured on the rewritten model's own (corrected upstream) activations, so on
those inputs its mean error per channel is ~0 and its squared error is not larger than without."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from gdws_onnx.core import decompose
from gdws_onnx import optimize
from gdws_onnx.calibrate.bias_correction import BiasCorrectionPass, BiasSite, mean_output_error
from gdws_onnx.cli import main
from gdws_onnx.graph.convs import ConstantResolver, find_convs
from gdws_onnx.graph.pattern import node_name
from gdws_onnx.graph.rewrite import GDWSRewritePass, LayerRewrite
from gdws_onnx.runtime.session import make_session, with_outputs

from builders import tiny_inputs, tiny_model


def _outputs(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """ORT values of intermediate tensors (the graph input passes through)."""
    sess = make_session(with_outputs(model, names))
    want = [n for n in names if n != "x"]
    vals = dict(zip(want, sess.run(want, {"x": x})))
    vals["x"] = x
    return {n: vals[n].astype(np.float64) for n in names}


def _conv(site, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The site's conv (same attributes) with the given weight and bias, float64 (the ONNX reference
    evaluator: ORT's CPU Conv has no double kernel)."""
    node = onnx.NodeProto()
    node.CopyFrom(site.node)
    del node.input[:]
    node.input.extend(["x", "w"] + (["b"] if bias is not None else []))
    node.output[0] = "y"
    inits = [numpy_helper.from_array(weight.astype(np.float64), "w")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float64), "b"))
    g = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, None)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return ReferenceEvaluator(m).run(None, {"x": x.astype(np.float64)})[0]


def _pw_bias(model: onnx.ModelProto, site) -> np.ndarray:
    node = next(n for n in model.graph.node if n.op_type == "Conv" and n.output[0] == site.node.output[0])
    if len(node.input) < 3 or not node.input[2]:
        return np.zeros(site.out_channels)
    init = {t.name: t for t in model.graph.initializer}
    return numpy_helper.to_array(init[node.input[2]]).astype(np.float64)


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_corrected_layers_have_zero_mean_error_and_no_larger_squared_error(tmp_path, budget):
    model = tiny_model(0)
    x = tiny_inputs(40, seed=4)
    np.savez(tmp_path / "cal.npz", x=x)
    sites = {s.name: s for s in find_convs(model)}
    plain, rep_plain = optimize(model, error_budget=budget, skip_first=False, verify=False, target="macs")
    fixed, rep = optimize(model, error_budget=budget, skip_first=False, verify=False,
                          bias_correction=True, data=str(tmp_path / "cal.npz"), target="macs")
    rewritten = [layer.name for layer in rep.rewritten]
    assert rewritten == ["conv_a", "conv_b", "conv_c"]  # conv_c has no bias in the original
    assert rep.bias_correction["samples"] == 40 and rep.bias_correction["inputs"].startswith("sequential")
    assert [layer["status"] for layer in rep.bias_correction["layers"]] == ["corrected"] * 3
    acts = _outputs(fixed, [n for s in sites.values() for n in (s.node.input[0], s.node.output[0])], x)
    acts_plain = _outputs(plain, [s.node.output[0] for s in sites.values()], x)
    improved = 0
    for name in rewritten:
        site = sites[name]
        xin = acts[site.node.input[0]]  # the corrected model's own input to this layer
        bias = _pw_bias(model, site)
        y_ref = _conv(site, xin, site.weight, bias)
        err = y_ref - acts[site.node.output[0]]
        shift = _pw_bias(fixed, site) - bias
        mean = err.mean(axis=(0, *range(2, err.ndim)))
        assert np.abs(mean).max() <= 1e-5 * max(1.0, np.abs(y_ref).max()), (name, mean)
        err_uncorrected = err + shift.reshape(1, -1, *[1] * (err.ndim - 2))  # same inputs, old bias
        sq, sq_u = float((err ** 2).sum()), float((err_uncorrected ** 2).sum())
        assert sq <= sq_u * (1 + 1e-9)
        improved += sq < sq_u * (1 - 1e-6)
        # and the shift is the layer's mean weight error applied to the mean input patch
        assert np.abs(shift).max() > 0
    assert improved >= 2
    # the first layer sees the same inputs either way: its corrected output is the plain one + shift
    a = sites["conv_a"]
    np.testing.assert_allclose(acts[a.node.output[0]] - acts_plain[a.node.output[0]],
                               np.broadcast_to((_pw_bias(fixed, a) - _pw_bias(model, a)).reshape(1, -1, 1, 1),
                                               acts[a.node.output[0]].shape), atol=1e-5)


def test_bias_correction_reports_its_own_objective():
    """The pass's squared errors (from patch Gram matrices) match the direct computation, and
    after = before - P ||mu||^2 <= before."""
    model = tiny_model(1)
    x = tiny_inputs(12, seed=7)
    sites = [s for s in find_convs(model) if s.name in ("conv_b", "conv_c")]
    rewrites = []
    for s in sites:
        spec = decompose.spectrum(s.weight, s.group)
        ranks = np.ones(spec.in_channels, np.int64)
        rewrites.append(LayerRewrite(s, decompose.factors(spec, ranks)))
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    GDWSRewritePass([LayerRewrite(next(t for t in find_convs(rewritten) if t.name == r.site.name), r.factors)
                     for r in rewrites]).call(rewritten)
    before = onnx.ModelProto()
    before.CopyFrom(rewritten)
    result = BiasCorrectionPass(rewrites, {"x": x}, batch_size=5, squared_error=True).call(rewritten)
    rep = result.report
    assert result.modified and result.model is rewritten
    acts = _outputs(rewritten, [s.node.input[0] for s in sites], x)
    for r, rec in zip(rewrites, rep.layers):
        s = r.site
        q = decompose.reconstruct(r.factors, s.in_channels)
        err = _conv(s, acts[s.node.input[0]], s.weight - q, None)
        assert rec.squared_error_before == pytest.approx(float((err ** 2).sum()) / len(x), rel=1e-6)
        mu = err.mean(axis=(0, 2, 3))
        assert rec.squared_error_after == pytest.approx(float(((err - mu[None, :, None, None]) ** 2).sum()) / len(x),
                                                        rel=1e-6, abs=1e-9)
        assert rec.squared_error_after <= rec.squared_error_before
        assert rec.max_abs_shift == pytest.approx(np.abs(mu).max(), rel=1e-6)
    # conv_c had no bias: now it has one; conv_b's old bias, read by nothing else, is gone
    names = {t.name for t in rewritten.graph.initializer}
    assert names == ({t.name for t in before.graph.initializer} - {"bb"}) | {node_name("conv_b", "pw_bias"),
                                                                            node_name("conv_c", "pw_bias")}


def test_a_conv_whose_bias_is_computed_at_run_time_is_skipped_with_the_reason():
    model = tiny_model(2)
    model.graph.node.insert(0, helper.make_node("RandomNormal", [], ["bb_random"], name="noise", shape=[6],
                                                dtype=onnx.TensorProto.FLOAT, seed=1.0))
    conv_b = next(n for n in model.graph.node if n.name == "conv_b")
    conv_b.input[2] = "bb_random"
    sites = [s for s in find_convs(model) if s.name in ("conv_b", "conv_c")]
    rewrites = [LayerRewrite(s, decompose.factors(spec, np.ones(spec.in_channels, np.int64)))
                for s, spec in ((s, decompose.spectrum(s.weight, s.group)) for s in sites)]
    GDWSRewritePass(rewrites).call(model)
    pw_b = next(n for n in model.graph.node if n.output[0] == "b")
    correction = BiasCorrectionPass(rewrites, {"x": tiny_inputs(6)}, batch_size=4)
    reason = correction.check(BiasSite(rewrites[0], pw_b, ConstantResolver(model)))
    assert "bias is not constant" in reason and "RandomNormal" in reason
    result = correction.call(model)
    assert [(layer.name, layer.status, layer.reason) for layer in result.report.layers] == [
        ("conv_b", "skipped", reason), ("conv_c", "corrected", "")]
    assert pw_b.input[2] == "bb_random"  # left as it was


def test_mean_output_error_grouped_matches_dense():
    rng = np.random.default_rng(0)
    w, q = rng.standard_normal((6, 2, 3, 3)), rng.standard_normal((6, 2, 3, 3))
    xbar = rng.standard_normal((4, 9))
    dense = np.zeros(6)
    for m in range(6):
        j = m // 3
        dense[m] = ((w[m] - q[m]).reshape(2, 9) * xbar[2 * j:2 * j + 2]).sum()
    np.testing.assert_allclose(mean_output_error(w, q, 2, xbar), dense, rtol=1e-12)


def test_cli_bias_correction(runner, tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(0), model)
    np.savez(tmp_path / "cal.npz", x=tiny_inputs(16))
    out = tmp_path / "o.onnx"
    r = runner.invoke(main, ["optimize", str(model), "-o", str(out), "--error-budget", "0.3", "--no-skip-first",
                             "--bias-correction", "--target", "macs"], catch_exceptions=False)
    assert r.exit_code == 2 and "--bias-correction needs --data" in r.output and not out.exists()
    r = runner.invoke(main, ["optimize", str(model), "-o", str(out), "--error-budget", "0.3", "--no-skip-first",
                             "--bias-correction", "--data", str(tmp_path / "cal.npz"), "--target", "macs"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "bias correction: 3 layer(s) shifted" in r.output and out.exists()
    onnx.checker.check_model(onnx.load(str(out)))


def test_fixed_batch_model_gives_the_same_correction(tmp_path):
    """A model whose input has a fixed batch of 4 is fed padded batches; 10 samples give the same
    biases as the dynamic-batch model."""
    dynamic = tiny_model(0)
    fixed = tiny_model(0)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    np.savez(tmp_path / "cal.npz", x=tiny_inputs(10, seed=9))
    kw = dict(error_budget=0.3, skip_first=False, verify=False, bias_correction=True, data=str(tmp_path / "cal.npz"))
    a, _ = optimize(dynamic, **kw)
    b, _ = optimize(fixed, **kw)
    for site in find_convs(dynamic):
        np.testing.assert_allclose(_pw_bias(b, site), _pw_bias(a, site), rtol=1e-5, atol=1e-6)
