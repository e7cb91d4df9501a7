"""Forward-only (gradient-free) alphas: exact patch energies, determinism, a layer that matters more
gets a larger sensitivity, agreement of the noise estimate with the gradient alphas, and the CLI.
No torch needed except for the comparison with the gradient alphas."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from gdws_onnx.cli import main
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.alphas.forward import forward_alphas
from gdws_onnx.core.geometry import patch_means, resolved_pads
from gdws_onnx.eval.gradients import OrtClassifier
from gdws_onnx.pipeline.optimize import load_alphas

from builders import tiny_inputs, tiny_model

FAST = dict(draws=2, tail_draws=0, threads=1)  # cheap settings for structural tests


def _direct_patch_stats(x: np.ndarray, kernel, strides, pads, dilations) -> tuple[np.ndarray, np.ndarray]:
    """(mean patch (C, K), E ||x_c patch||^2 (C,)) by explicit loops over samples and positions."""
    n_sp = len(kernel)
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[i + n_sp]) for i in range(n_sp)])
    out = [(x.shape[2 + i] + pads[i] + pads[i + n_sp] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(n_sp)]
    patches = []
    for sample in xp:
        for pos in np.ndindex(*out):
            patch = np.stack([sample[(slice(None), *[p * s + k * d for p, s, k, d in zip(pos, strides, offs, dilations)])]
                              for offs in np.ndindex(*kernel)], axis=1)  # (C, K)
            patches.append(patch)
    patches = np.stack(patches)  # (N P, C, K)
    return patches.mean(0), (patches ** 2).sum(2).mean(0)


@pytest.mark.parametrize("kernel, strides, dilations, pads, auto_pad", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET"),
    ((3, 3), (2, 2), (2, 1), (1, 0, 0, 2), "NOTSET"),
    ((2, 3), (1, 2), (1, 1), None, "SAME_UPPER"),
    ((2, 2), (2, 1), (1, 2), None, "SAME_LOWER"),
    ((3, 2), (1, 1), (1, 1), None, "VALID"),
    ((3,), (2,), (2,), (2, 1), "NOTSET"),
    ((2, 2, 2), (1, 2, 1), (1, 1, 2), (1, 0, 1, 0, 1, 1), "NOTSET"),
])
def test_patch_means_match_explicit_patches(kernel, strides, dilations, pads, auto_pad):
    rng = np.random.default_rng(len(kernel) + sum(strides))
    spatial = {1: (9,), 2: (7, 8), 3: (5, 6, 5)}[len(kernel)]
    x = rng.standard_normal((3, 2, *spatial))
    p = resolved_pads(spatial, kernel, strides, pads or (), dilations, auto_pad)
    mean_ref, energy_ref = _direct_patch_stats(x, kernel, strides, p, dilations)
    np.testing.assert_allclose(patch_means(x.sum(0), 3, kernel, strides, p, dilations), mean_ref, rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(patch_means((x ** 2).sum(0), 3, kernel, strides, p, dilations).sum(1), energy_ref,
                               rtol=1e-12)


def test_energy_factor_equals_numpy_on_tiny_model():
    """e_{l,c} of every conv (dilated, grouped + strided + asymmetric pads, SAME_UPPER) against patches
    cut by hand from the activations of the ONNX reference evaluator (not ONNX Runtime)."""
    model, x = tiny_model(0), tiny_inputs(7)
    res = forward_alphas(model, x, **FAST)
    ref = ReferenceEvaluator(model)
    for site in find_convs(model):
        act = ref.run([site.node.input[0]], {"x": x})[0] if site.node.input[0] != "x" else x
        pads = resolved_pads(act.shape[2:], site.kernel_shape, site.strides, site.pads, site.dilations, site.auto_pad)
        _, energy = _direct_patch_stats(act, site.kernel_shape, site.strides, pads, site.dilations)
        np.testing.assert_allclose(res.energy[site.name], energy, rtol=1e-5)
    assert res.settings["method"] == "forward" and res.settings["weighting"] == "margin"


@pytest.mark.parametrize("weighting", ["margin", "noise-gain"])
def test_alphas_positive_finite_and_deterministic(weighting):
    model, x = tiny_model(1), tiny_inputs(24, seed=2)
    kw = dict(weighting=weighting, draws=2, tail_draws=6, threads=1)
    a = forward_alphas(model, x, seed=5, **kw)
    b = forward_alphas(model, x, seed=5, **kw)
    c = forward_alphas(model, x, seed=6, **kw)
    assert [i.name for i in a.layers] == ["conv_a", "conv_b", "conv_c"]
    for name, alpha in a.alphas.items():
        assert alpha.shape == (next(i for i in a.layers if i.name == name).in_channels,)
        assert np.all(np.isfinite(alpha)) and np.all(alpha > 0), (name, alpha)
        np.testing.assert_array_equal(alpha, b.alphas[name])
        assert a.layer_total[name] == pytest.approx(alpha.sum(), rel=1e-12)
        assert a.sample_mass[name].mean() == pytest.approx(alpha.sum(), rel=1e-12)
    assert any(not np.array_equal(a.alphas[k], c.alphas[k]) for k in a.alphas)
    # split "mean": alpha = e * s_l with the same layer totals
    m = forward_alphas(model, x, seed=5, split="mean", **kw)
    for name in a.alphas:
        np.testing.assert_allclose(m.alphas[name], m.energy[name] * m.layer_sensitivity[name], rtol=1e-12)
        assert m.layer_total[name] == pytest.approx(a.layer_total[name], rel=1e-12)


def two_branch(gain_p: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """x -> conv_p -> Relu -> Gemm (readout x gain_p) and x -> conv_q -> Relu -> Gemm, summed into 4 logits."""
    rng = np.random.default_rng(seed)
    w = {"wp": rng.standard_normal((3, 2, 3, 3)) / 3, "wq": rng.standard_normal((3, 2, 3, 3)) / 3,
         "rp": gain_p * rng.standard_normal((4, 3 * 5 * 5)) / 5, "rq": rng.standard_normal((4, 3 * 5 * 5)) / 5}
    nodes = []
    for b in "pq":
        nodes += [helper.make_node("Conv", ["x", f"w{b}"], [f"c{b}"], name=f"conv_{b}", kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{b}"], [f"a{b}"]),
                  helper.make_node("Flatten", [f"a{b}"], [f"f{b}"]),
                  helper.make_node("Gemm", [f"f{b}", f"r{b}"], [f"z{b}"], transB=1)]
    nodes.append(helper.make_node("Add", ["zp", "zq"], ["logits"]))
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("weighting", ["noise-gain", "margin"])
def test_a_layer_that_matters_more_gets_a_larger_sensitivity(weighting):
    """Multiplying what reads conv_p's output by 10 makes a unit of conv_p's weight error move the
    logits 10x more: s_p / s_q must grow by about 100 (both branches see the same input)."""
    x = np.random.default_rng(3).random((32, 2, 5, 5)).astype(np.float32)
    ratio = {}
    for gain in (1.0, 10.0):
        r = forward_alphas(two_branch(gain), x, weighting=weighting, draws=4, tail_draws=16, threads=1)
        np.testing.assert_allclose(r.energy["conv_p"], r.energy["conv_q"], rtol=1e-12)
        ratio[gain] = r.layer_sensitivity["conv_p"] / r.layer_sensitivity["conv_q"]
    assert ratio[10.0] > 30 * ratio[1.0], ratio


def test_layer_totals_estimate_the_gradient_alphas():
    """T_l = sum_c alpha_{l,c} is an unbiased estimate of the gradient alphas' layer total (first
    order): over three seeds, with the heaviest quarter of the samples given many draws, they
    agree within the estimated noise. (One near-tie sample carries ~90 % of every T_l here.)"""
    pytest.importorskip("torch")
    from gdws_onnx.alphas.noise_gain import noise_gain_alphas

    model, x = tiny_model(0), tiny_inputs(16)
    grad = noise_gain_alphas(model, x, dtype="float64", threads=1)
    runs = [forward_alphas(model, x, weighting="noise-gain", draws=24, tail=0.25, tail_draws=200, seed=s, threads=1)
            for s in range(3)]
    for name, a in grad.alphas.items():
        est = np.mean([r.layer_total[name] for r in runs])
        se = np.sqrt(np.sum([r.noise_std[name] ** 2 for r in runs])) / len(runs)
        assert est == pytest.approx(a.sum(), rel=0.2), name
        assert abs(est - a.sum()) <= 4 * se, (name, est, a.sum(), se)


def test_cli_forward_method_writes_what_optimize_accepts(runner, tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(0), model)
    data = tmp_path / "data.npz"
    x = tiny_inputs(24)
    np.savez(data, x=x, y=OrtClassifier(tiny_model(0))(x).argmax(1))
    out = tmp_path / "fwd.npz"
    r = runner.invoke(main, ["sensitivity", str(model), "--data", str(data), "--method", "forward", "--draws", "2",
                             "--threads", "1", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "forward (margin) alphas" in r.output and "ONNX Runtime runs" in r.output
    alphas = load_alphas(str(out))
    assert sorted(alphas) == ["conv_a", "conv_b", "conv_c"] and alphas["conv_b"].shape == (4,)
    meta = json.loads((tmp_path / "fwd.npz.meta.json").read_text())
    assert meta["format"] == "onnx-gdws forward alphas v1" and meta["settings"]["method"] == "forward"
    assert meta["samples"] == 24 and set(meta["layer_sensitivity"]) == set(alphas)
    o = tmp_path / "o.onnx"
    r = runner.invoke(main, ["optimize", str(model), "-o", str(o), "--alphas", str(out), "--error-budget", "0.2",
                             "--no-skip-first", "--target", "macs"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["sensitivity", str(model), "--data", str(data), "--method", "forward", "--draws", "0",
                             "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 2 and "--draws" in r.output
