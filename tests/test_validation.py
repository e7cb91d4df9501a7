"""Validation: statistics, gradient sources and their gate, attacks, and the sanity properties
robust accuracy must have (issue 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gdws_onnx import GDWSError, validate
from gdws_onnx.eval.attacks import AttackSettings, pgd, square_linf
from gdws_onnx.cli import main
from gdws_onnx.eval.gradients import OrtClassifier, check_gradient_source, make_source
from gdws_onnx.core.stats import error_stats, mcnemar_exact, wilson_interval
from gdws_onnx.graph.pattern import DEPTHWISE, POINTWISE, node_name
from validate_helpers import fashion, fm_cnn, gdws_of, op_model

import onnx
from onnx import helper

torch = pytest.importorskip("torch")
pytest.importorskip("onnx_ad")

N = 96


@pytest.fixture(scope="module")
def data(fashion_mnist):
    return fashion(N)


@pytest.fixture(scope="module")
def model(fashion_mnist):
    return fm_cnn(0)


@pytest.fixture(scope="module")
def model_gdws(model):
    return gdws_of(model, error_budget=0.05)


# ------------------------------------------------------------------ statistics

def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


def test_mcnemar_exact_known_values():
    a = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 1, 0], bool)
    r = mcnemar_exact(a, b)
    assert (r.a_only, r.b_only) == (5, 0)
    assert r.p_value == pytest.approx(2 * 0.5 ** 5)
    assert mcnemar_exact(a, a).p_value == 1.0


def test_error_stats_identical_and_scaled():
    z = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
    e = error_stats(z, z)
    assert e.max_abs == 0 and e.cosine_min == pytest.approx(1.0)
    assert error_stats(z, 2 * z).max_abs == pytest.approx(float(np.abs(z).max()), rel=1e-6)


# ------------------------------------------------------------------ gradient sources

@pytest.mark.parametrize("which", ["plain", "gdws"])
def test_sources_agree_with_each_other_and_ort(which, model, model_gdws, data):
    m = model if which == "plain" else model_gdws
    x, y = data[0][:16], data[1][:16]
    ort = OrtClassifier(m)
    a, t = make_source(m, "onnx-ad", batch_size=16), make_source(m, "torch")
    ref = ort(x)
    for src in (a, t):
        assert np.abs(src.forward(x) - ref).max() < 1e-4
    adj = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32)
    ga, gt = a.vjp(x, adj), t.vjp(x, adj)
    assert np.abs(ga - gt).max() <= 1e-4 * max(1.0, np.abs(gt).max())
    (_, ca), (_, ct) = a.ce_grad(x, y), t.ce_grad(x, y)
    assert np.abs(ca - ct).max() <= 1e-4 * max(1.0, np.abs(ct).max())


def _conv_bn_pool_net(second_conv_pads: dict):
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.3,
             "wg": rng.standard_normal((6, 2, 3, 3)).astype(np.float32) * 0.3,
             "s": rng.random(6).astype(np.float32) + 0.5, "b": rng.standard_normal(6).astype(np.float32),
             "m": rng.standard_normal(6).astype(np.float32) * 0.1, "v": rng.random(6).astype(np.float32) + 0.5}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], dilations=[1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("LeakyRelu", ["bn"], ["r"], alpha=0.1),
             helper.make_node("Conv", ["r", "wg"], ["g"], group=3, strides=[2, 2], **second_conv_pads),
             helper.make_node("AveragePool", ["g"], ["ap"], kernel_shape=[2, 2], strides=[1, 1]),
             helper.make_node("MaxPool", ["ap"], ["z"], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1])]
    return op_model(nodes, inits, in_shape=("N", 3, 8, 8))


def test_sources_agree_on_more_operators():
    m = _conv_bn_pool_net({"pads": [1, 1, 1, 1]})
    x = np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float32)
    ref = OrtClassifier(m)(x)
    a, t = make_source(m, "onnx-ad", batch_size=4), make_source(m, "torch")
    adj = np.random.default_rng(2).standard_normal(ref.shape).astype(np.float32)
    assert np.abs(t.forward(x) - ref).max() < 1e-4
    assert np.abs(a.vjp(x, adj) - t.vjp(x, adj)).max() < 1e-4


def test_gate_catches_onnx_ad_asymmetric_pad_bug_and_auto_falls_back_to_torch():
    """onnx-ad 0.3.0 returns wrong input gradients for Conv with asymmetric pads (and refuses
    auto_pad); the finite-difference gate must reject it and `auto` must use the torch replica."""
    x = np.random.default_rng(0).random((8, 3, 8, 8)).astype(np.float32)
    m = _conv_bn_pool_net({"pads": [0, 0, 1, 1]})
    ort = OrtClassifier(m)
    y = ort(x).argmax(1)
    assert not check_gradient_source(make_source(m, "onnx-ad", batch_size=8), ort, x, y).passed
    assert check_gradient_source(make_source(m, "torch"), ort, x, y).passed
    r = validate(m, m, x=x, y=y, eps=0.01, steps=2)
    assert r.original.gradient_source == "torch"
    m_auto = _conv_bn_pool_net({"auto_pad": "SAME_UPPER"})
    with pytest.raises(GDWSError, match="auto_pad"):
        make_source(m_auto, "onnx-ad", batch_size=4).vjp(x[:4], np.ones((4, 36), np.float32))
    assert np.abs(make_source(m_auto, "torch").forward(x) - OrtClassifier(m_auto)(x)).max() < 1e-4


def test_onnx_ad_gradients_on_gdws_graph_are_deterministic():
    """Gather backward = ScatterND(add) over duplicate indices: raced on >1 ORT thread."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    m = op_model([helper.make_node("Conv", ["x", "w"], ["z"], pads=[1, 1, 1, 1])], {"w": w},
                 in_shape=("N", 32, 14, 14))
    g = gdws_of(m, error_budget=0.05)
    x = rng.random((8, 32, 14, 14)).astype(np.float32)
    adj = rng.standard_normal((8, 64 * 14 * 14)).astype(np.float32)
    src = make_source(g, "onnx-ad", batch_size=8, threads=2)
    runs = [src.vjp(x, adj) for _ in range(6)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])


def test_torch_source_names_unsupported_operator():
    m = op_model([helper.make_node("Erf", ["x"], ["z"])], {}, in_shape=(1, 3, 4, 4))
    with pytest.raises(GDWSError, match="Erf"):
        make_source(m, "torch")


class _Broken:
    """A gradient source whose input gradient is wrong (a fixed random direction)."""

    name = "broken"

    def __init__(self, inner):
        self.inner = inner

    def forward(self, x):
        return self.inner.forward(x)

    def vjp(self, x, adj):
        g = self.inner.vjp(x, adj)
        return np.random.default_rng(0).permutation(g.reshape(len(g), -1), axis=1).reshape(g.shape)

    def ce_grad(self, x, y):
        logits = self.forward(x)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        return logits, self.vjp(x, p.astype(np.float32))


def test_gradient_gate_passes_true_and_rejects_wrong_gradients(model, data):
    x, y = data[0][:8], data[1][:8]
    ort = OrtClassifier(model)
    good = make_source(model, "onnx-ad", batch_size=8)
    assert check_gradient_source(good, ort, x, y).passed
    bad = check_gradient_source(_Broken(good), ort, x, y)
    assert not bad.passed and "finite differences" in bad.message


# ------------------------------------------------------------------ attacks and sanity properties

def _robust(model, x, y, **kw):
    src = make_source(model, "onnx-ad", batch_size=64)
    return pgd(OrtClassifier(model), src, x, y, AttackSettings(**kw))


def test_pgd_eps_zero_equals_clean_and_stays_in_ball(model, data):
    x, y = data
    clean = OrtClassifier(model)(x).argmax(1) == y
    r0 = _robust(model, x, y, eps=0.0)
    assert np.array_equal(r0.robust, clean)
    r = _robust(model, x, y, eps=0.05)
    assert np.abs(r.x_adv - x).max() <= 0.05 + 1e-6 and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert r.robust.sum() < clean.sum()  # the attack does something on a non-robust model


def test_robust_accuracy_falls_with_eps_and_steps_do_not_help_the_model(model, data):
    x, y = data
    accs = [_robust(model, x, y, eps=e, steps=10).robust.mean() for e in (0.0, 0.01, 0.03, 0.1)]
    assert all(b <= a for a, b in zip(accs, accs[1:])) and accs[-1] < accs[0] - 0.3, accs
    few = _robust(model, x, y, eps=0.02, steps=5).robust.mean()
    many = _robust(model, x, y, eps=0.02, steps=40).robust.mean()
    assert many <= few + 2 / len(x)


def test_pgd_l2_in_ball(model, data):
    x, y = data[0][:32], data[1][:32]
    r = _robust(model, x, y, name="pgd-l2", eps=1.0, steps=10)
    assert np.linalg.norm((r.x_adv - x).reshape(len(x), -1), axis=1).max() <= 1.0 + 1e-4


def test_square_attack_needs_no_gradients_and_is_weaker_than_pgd(model, data):
    x, y = data[0][:48], data[1][:48]
    ort = OrtClassifier(model)
    clean = ort(x).argmax(1) == y
    sq = square_linf(ort, x, y, AttackSettings(name="square", eps=0.05, queries=200))
    assert np.abs(sq.x_adv - x).max() <= 0.05 + 1e-6
    assert sq.robust.sum() < clean.sum()
    assert not np.any(sq.robust & ~clean)  # never robust where not clean


@pytest.mark.slow
def test_autoattack_over_the_ort_bridge(model, data):
    """torchattacks drives ORT forward + source backward (the backward runs inside torch's
    backward, where grad mode is off); results are re-scored in ORT and stay in the ball."""
    pytest.importorskip("torchattacks")
    from gdws_onnx.eval.attacks import autoattack

    x, y = data[0][:6], data[1][:6]
    ort = OrtClassifier(model)
    res = autoattack(ort, make_source(model, "torch"), x, y, AttackSettings(name="autoattack", eps=0.05),
                     n_classes=10)
    clean = ort(x).argmax(1) == y
    assert res.max_perturbation <= 0.05 + 1e-6
    assert not np.any(res.robust & ~clean) and res.robust.sum() < clean.sum()
    assert np.array_equal(ort(res.x_adv).argmax(1) == y, res.robust)


# ------------------------------------------------------------------ validate()

def test_validate_identical_model_zero_drop(model, data):
    x, y = data
    r = validate(model, model, x=x, y=y, eps=0.03, steps=5)
    assert r.agreement == 1.0 and r.clean_drop_pp == 0.0 and r.robust_drop_pp == 0.0
    assert r.output_error["max_abs"] == 0.0
    assert r.original.robust_accuracy < r.original.clean_accuracy
    assert r.original.gradient_check["passed"]


def test_validate_gdws_model_and_gates(model, model_gdws, data):
    x, y = data
    r = validate(model, model_gdws, x=x, y=y, eps=0.03, steps=5, max_drop_clean=100.0)
    assert r.passed and 0.8 <= r.agreement <= 1.0
    assert r.original.gradient_source == r.optimized.gradient_source == "torch"
    strict = validate(model, model_gdws, x=x, y=y, attacks=(), max_drop_clean=-0.0)
    if strict.clean_drop_pp > 0:
        assert not strict.passed
    with pytest.raises(GDWSError, match="eps"):
        validate(model, model, x=x, y=y, eps=-1.0)
    with pytest.raises(GDWSError, match=r"\[0, 1\]"):
        validate(model, model, x=x * 255, y=y)


def test_softmax_output_is_cut_to_logits(data):
    x, y = data[0][:16], data[1][:16]
    m = fm_cnn(0, softmax=True)
    r = validate(m, m, x=x, y=y, eps=0.03, steps=3)
    assert r.original.softmax_cut and r.original.gradient_check["passed"]


@pytest.mark.slow
def test_cli_validate_report_and_gate(tmp_path, model, model_gdws, data):
    x, y = data
    np.savez(tmp_path / "d.npz", x=x, y=y)
    import onnx

    onnx.save(model, tmp_path / "a.onnx")
    onnx.save(model_gdws, tmp_path / "b.onnx")
    rep = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                                    "--data", str(tmp_path / "d.npz"), "--n", "64", "--eps", "0.03",
                                    "--steps", "5", "--threads", "1", "--report", str(rep)])
    assert res.exit_code == 0, res.output
    d = json.loads(rep.read_text())
    for k in ("clean_accuracy", "robust_accuracy", "robust_accuracy_by_attack", "gradient_source"):
        assert k in d["original"] and k in d["optimized"]
    assert "agreement" in d and d["data"]["indices"] == list(range(64))
    assert d["attacks"][0]["eps"] == 0.03 and d["versions"]["onnxruntime"]
    # a crude rewrite against a zero-drop gate -> exit 1; a gate without an attack -> exit 2
    onnx.save(gdws_of(model, error_budget=0.6), tmp_path / "c.onnx")
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "a.onnx"), str(tmp_path / "c.onnx"),
                                    "--data", str(tmp_path / "d.npz"), "--attack", "none",
                                    "--max-drop-clean", "0"])
    assert res.exit_code == 1 and "clean accuracy dropped" in res.output, res.output
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx"),
                                    "--data", str(tmp_path / "d.npz"), "--attack", "none",
                                    "--max-drop-robust", "1"])
    assert res.exit_code == 2, res.output
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "a.onnx"), str(tmp_path / "missing.onnx"),
                                    "--data", str(tmp_path / "d.npz")])
    assert res.exit_code == 2


# ------------------------------------------------------------------ per-operator parity of the torch replica

def _w(*shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(np.float32)


_X = ("N", 3, 6, 6)
_OP_CASES = {
    # name: (nodes ending in "z", initializers, input shape)
    "Conv": ([helper.make_node("Conv", ["x", "w"], ["z"], pads=[1, 0, 1, 2], strides=[2, 1], dilations=[1, 2])],
             {"w": _w(4, 3, 3, 2)}, _X),
    "ConvAutoPad": ([helper.make_node("Conv", ["x", "w"], ["z"], auto_pad="SAME_LOWER", strides=[2, 2])],
                    {"w": _w(4, 3, 3, 3)}, _X),
    "Gather": ([helper.make_node("Gather", ["x", "i"], ["z"], axis=1)], {"i": np.array([0, 0, 2, 1, 2], np.int64)}, _X),
    "Relu": ([helper.make_node("Relu", ["x"], ["z"])], {}, _X),
    "LeakyRelu": ([helper.make_node("LeakyRelu", ["x"], ["z"], alpha=0.2)], {}, _X),
    "Sigmoid": ([helper.make_node("Sigmoid", ["x"], ["z"])], {}, _X),
    "Tanh": ([helper.make_node("Tanh", ["x"], ["z"])], {}, _X),
    "Neg": ([helper.make_node("Neg", ["x"], ["z"])], {}, _X),
    "AddSubMulDiv": ([helper.make_node("Add", ["x", "a"], ["t1"]), helper.make_node("Mul", ["t1", "b"], ["t2"]),
                      helper.make_node("Sub", ["t2", "a"], ["t3"]), helper.make_node("Div", ["t3", "c"], ["z"])],
                     {"a": _w(3, 1, 1), "b": _w(1, 6), "c": np.float32(1.5) + np.abs(_w(3, 1, 1))}, _X),
    "Sum": ([helper.make_node("Sum", ["x", "x", "a"], ["z"])], {"a": _w(3, 1, 1)}, _X),
    "Clip": ([helper.make_node("Clip", ["x", "lo", "hi"], ["z"])], {"lo": np.float32(0.2), "hi": np.float32(0.7)}, _X),
    "Softmax": ([helper.make_node("Softmax", ["x"], ["z"], axis=1)], {}, _X),
    "LogSoftmax": ([helper.make_node("LogSoftmax", ["x"], ["z"], axis=-1)], {}, _X),
    "BatchNormalization": ([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["z"])],
                           {"s": _w(3), "b": _w(3), "m": _w(3), "v": np.abs(_w(3)) + 0.5}, _X),
    "MaxPool": ([helper.make_node("MaxPool", ["x"], ["z"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
                {}, _X),
    "AveragePool": ([helper.make_node("AveragePool", ["x"], ["z"], kernel_shape=[3, 3], strides=[2, 2],
                                      pads=[1, 1, 0, 0], count_include_pad=0)], {}, _X),
    "GlobalAveragePool": ([helper.make_node("GlobalAveragePool", ["x"], ["z"])], {}, _X),
    "GlobalMaxPool": ([helper.make_node("GlobalMaxPool", ["x"], ["z"])], {}, _X),
    "LRN": ([helper.make_node("LRN", ["x"], ["z"], size=3, alpha=1e-2, beta=0.75, bias=1.0)], {}, _X),
    "FlattenGemm": ([helper.make_node("Flatten", ["x"], ["f"]),
                     helper.make_node("Gemm", ["f", "g", "gb"], ["z"], transB=1, alpha=0.5, beta=2.0)],
                    {"g": _w(5, 108), "gb": _w(5)}, _X),
    "MatMul": ([helper.make_node("MatMul", ["x", "mm"], ["z"])], {"mm": _w(6, 4)}, _X),
    "ReshapeTranspose": ([helper.make_node("Reshape", ["x", "shp"], ["r"]),
                          helper.make_node("Transpose", ["r"], ["z"], perm=[0, 2, 1])],
                         {"shp": np.array([0, 3, 36], np.int64)}, _X),
    "SqueezeUnsqueeze": ([helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
                          helper.make_node("Squeeze", ["u", "ax"], ["z"])], {"ax": np.array([2], np.int64)}, _X),
    "ShapeConcatReshape": ([helper.make_node("Shape", ["x"], ["s"]),
                            helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
                            helper.make_node("Concat", ["n", "m1"], ["shp"], axis=0),
                            helper.make_node("Reshape", ["x", "shp"], ["z"])],
                           {"i0": np.array([0], np.int64), "m1": np.array([-1], np.int64)}, _X),
    "ConcatFeatures": ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Concat", ["x", "a"], ["z"], axis=1)],
                       {}, _X),
    "ReduceMean": ([helper.make_node("ReduceMean", ["x"], ["z"], axes=[2, 3], keepdims=1)], {}, _X),  # opset 17
    "Pad": ([helper.make_node("Pad", ["x", "p"], ["z"], mode="constant")],
            {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, _X),
    "CastIdentityDropout": ([helper.make_node("Cast", ["x"], ["c"], to=onnx.TensorProto.FLOAT),
                             helper.make_node("Identity", ["c"], ["i"]), helper.make_node("Dropout", ["i"], ["z"])],
                            {}, _X),
    "ConstantConstantOfShape": ([helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(_w(3, 1, 1))),
                                 helper.make_node("ConstantOfShape", ["shp"], ["o"],
                                                  value=onnx.numpy_helper.from_array(np.array([0.5], np.float32))),
                                 helper.make_node("Mul", ["x", "k"], ["t"]), helper.make_node("Add", ["t", "o"], ["z"])],
                                {"shp": np.array([6], np.int64)}, _X),
}


def test_cli_validate_refuses_zero_threads(tmp_path, model):
    import onnx

    onnx.save(model, tmp_path / "a.onnx")
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx"),
                                    "--attack", "none", "--threads", "0"])
    assert res.exit_code == 2 and "--threads must be >= 1" in res.output, res.output


def test_torch_source_computes_on_its_threads_and_restores_torch_s(model, data, monkeypatch):
    torch = pytest.importorskip("torch")
    from gdws_onnx.eval.gradients.torch_source import TorchSource

    x, y = data
    before = torch.get_num_threads()
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    src = TorchSource(model, threads=1)
    for f in (lambda: src.forward(x[:4]), lambda: src.vjp(x[:4], np.ones((4, 10), np.float32)),
              lambda: src.ce_grad(x[:4], y[:4])):
        calls.clear()
        f()
        assert calls == [1, before] and torch.get_num_threads() == before
    calls.clear()
    TorchSource(model).forward(x[:4])  # no threads asked: torch's setting untouched
    assert calls == []


def test_op_cases_cover_every_supported_operator():
    from gdws_onnx.eval.gradients import TORCH_OPS

    used = {n.op_type for nodes, _, _ in _OP_CASES.values() for n in nodes}
    assert set(TORCH_OPS) <= used, sorted(set(TORCH_OPS) - used)


@pytest.mark.parametrize("case", sorted(_OP_CASES))
def test_torch_replica_matches_ort_per_operator(case):
    nodes, inits, shape = _OP_CASES[case]
    m = op_model(nodes, inits, in_shape=shape)
    x = (np.random.default_rng(1).random((2, *shape[1:])) * 2 - 1).astype(np.float32)  # both signs
    ort = OrtClassifier(m)
    ref = ort(x)
    src = make_source(m, "torch")
    assert np.abs(src.forward(x) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    # directional derivative of w . y along a random direction vs central differences on ORT
    rng = np.random.default_rng(2)
    w = rng.standard_normal(ref.shape).astype(np.float32)
    v = rng.standard_normal(x.shape)
    g = src.vjp(x, w).astype(np.float64)
    h = 1e-3
    fd = np.sum(w * (ort((x + h * v).astype(np.float32)) - ort((x - h * v).astype(np.float32)))) / (2 * h)
    an = float(np.sum(g * v))
    assert abs(fd - an) <= 2e-2 * max(1.0, abs(an)), (fd, an)


# ------------------------------------------------------------------ fused GDWS chains in the torch replica

def _replica_pair(m):
    from gdws_onnx.eval.gradients import GDWSChain, TorchReplica

    fused, plain = TorchReplica(m, fuse_gdws=True), TorchReplica(m)
    return fused, plain, sum(isinstance(n, GDWSChain) for n in fused.nodes)


@pytest.mark.parametrize("attrs", [dict(pads=[1, 1, 1, 1]), dict(pads=[0, 1, 2, 0], strides=[2, 1], dilations=[1, 2]),
                                   dict(auto_pad="SAME_UPPER", strides=[2, 2])])
def test_fused_gdws_chain_equals_the_graph(attrs):
    """Gather -> depthwise -> 1x1 evaluated as one conv: same outputs and gradients as ORT / the
    unfused replica, for Gather and channel-multiplier forms (named as the rewrite names them:
    the replica recognises layers by graph.pattern, so the same chain unnamed is left alone)."""
    rng = np.random.default_rng(0)
    base = op_model([helper.make_node("Conv", ["x", "w", "b"], ["z"], **attrs)],
                    {"w": rng.standard_normal((5, 4, 3, 3)).astype(np.float32), "b": _w(5)}, in_shape=("N", 4, 9, 9))
    gather_form = gdws_of(base, error_budget=0.2)

    def multiplier_form(named: bool):
        dw_name, pw_name = (node_name("c", DEPTHWISE), node_name("c", POINTWISE)) if named else ("", "")
        return op_model([helper.make_node("Conv", ["x", "dw", "db"], ["h"], group=4, name=dw_name, **attrs),
                         helper.make_node("Conv", ["h", "pw", "pb"], ["z"], name=pw_name)],
                        {"dw": _w(8, 1, 3, 3), "db": _w(8), "pw": _w(5, 8, 1, 1), "pb": _w(5)}, in_shape=("N", 4, 9, 9))

    mult = multiplier_form(named=True)
    assert _replica_pair(multiplier_form(named=False))[2] == 0
    x = rng.random((3, 4, 9, 9)).astype(np.float32)
    for m in (gather_form, mult):
        fused, plain, n_chains = _replica_pair(m)
        assert n_chains == 1
        xt = torch.from_numpy(x).requires_grad_(True)
        yf = fused(xt)
        ref = OrtClassifier(m)(x)
        assert np.abs(yf.detach().numpy() - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
        adj = torch.from_numpy(rng.standard_normal(ref.shape).astype(np.float32))
        (gf,) = torch.autograd.grad(yf, xt, adj)
        xt2 = torch.from_numpy(x).requires_grad_(True)
        (gp,) = torch.autograd.grad(plain(xt2), xt2, adj)
        assert torch.allclose(gf, gp, atol=1e-5, rtol=1e-4)


def test_chain_with_a_shared_intermediate_is_not_fused():
    nodes = [helper.make_node("Conv", ["x", "dw"], ["h"], group=4, pads=[1, 1, 1, 1], name=node_name("c", DEPTHWISE)),
             helper.make_node("Conv", ["h", "pw"], ["p"], name=node_name("c", POINTWISE)),
             helper.make_node("GlobalAveragePool", ["h"], ["g"]),
             helper.make_node("Conv", ["g", "pw"], ["q"]),
             helper.make_node("Add", ["p", "q"], ["z"])]
    m = op_model(nodes, {"dw": _w(8, 1, 3, 3), "pw": _w(5, 8, 1, 1)}, in_shape=("N", 4, 6, 6))
    fused, _, n_chains = _replica_pair(m)
    assert n_chains == 0
    x = np.random.default_rng(0).random((2, 4, 6, 6)).astype(np.float32)
    assert np.abs(fused(torch.from_numpy(x)).numpy() - OrtClassifier(m)(x)).max() < 1e-5


# ------------------------------------------------------------------ without a gradient source (issue 16)

def _tiny_classifier(tmp_path):
    """A random 1-conv classifier (16 outputs) saved to a.onnx, and 12 samples labelled by it."""
    rng = np.random.default_rng(0)
    m = op_model([helper.make_node("Conv", ["x", "w"], ["z"], strides=[2, 2])],
                 {"w": rng.standard_normal((4, 1, 3, 3)).astype(np.float32)}, in_shape=("N", 1, 5, 5))
    onnx.save(m, tmp_path / "a.onnx")
    x = rng.random((12, 1, 5, 5)).astype(np.float32)
    y = OrtClassifier(m)(x).argmax(1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return str(tmp_path / "a.onnx"), str(tmp_path / "d.npz")


def test_white_box_without_a_gradient_source_exits_2_before_any_work(tmp_path, monkeypatch):
    import gdws_onnx.eval.validation as validation

    model, data = _tiny_classifier(tmp_path)
    monkeypatch.setattr(validation, "installed_sources", lambda: ())

    def no_work(*a, **k):
        raise AssertionError("data loaded before the gradient source was found")

    monkeypatch.setattr(validation, "load_dataset", no_work)
    monkeypatch.setattr(validation, "evaluate_model", no_work)
    res = CliRunner().invoke(main, ["validate", model, model, "--data", "fashion-mnist:test"])
    assert res.exit_code == 2, res.output
    assert "pip install torch" in res.output and "onnx-ad" in res.output and ".[validate]" in res.output
    assert "square" in res.output
    # an explicit source that is not installed is named, even when another one is
    monkeypatch.setattr(validation, "installed_sources", lambda: ("torch",))
    res = CliRunner().invoke(main, ["validate", model, model, "--data", data, "--gradient", "onnx-ad"])
    assert res.exit_code == 2 and "pip install onnx-ad" in res.output, res.output
    with pytest.raises(GDWSError, match="no gradient source"):
        monkeypatch.setattr(validation, "installed_sources", lambda: ())
        validate(model, model, data=data, attacks=("pgd-l2",))


def test_square_runs_without_torch_and_is_labelled_square(tmp_path, monkeypatch):
    import sys

    model, data = _tiny_classifier(tmp_path)
    for package in ("torch", "onnx_ad", "torchattacks"):  # `import torch` now raises ImportError
        monkeypatch.setitem(sys.modules, package, None)
    rep = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["validate", model, model, "--data", data, "--attack", "square",
                                    "--queries", "30", "--eps", "0.3", "--report", str(rep)])
    assert res.exit_code == 0, res.output
    assert "(square)" in res.output and "pgd" not in res.output
    d = json.loads(rep.read_text())
    assert [a["name"] for a in d["attacks"]] == ["square"]
    for r in (d["original"], d["optimized"]):
        assert set(r["robust_accuracy_by_attack"]) == {"square"} and r["gradient_source"] is None
        assert r["robust_accuracy"] == r["robust_accuracy_by_attack"]["square"]
    # and pgd, asked for without torch, is refused rather than replaced by Square
    res = CliRunner().invoke(main, ["validate", model, model, "--data", data, "--gradient", "torch"])
    assert res.exit_code == 2 and "pip install torch" in res.output, res.output


def test_a_model_no_source_can_differentiate_is_an_error_not_a_weaker_attack(tmp_path, monkeypatch):
    import gdws_onnx.eval.validation as validation

    model, data = _tiny_classifier(tmp_path)

    def unsupported(*a, **k):
        raise GDWSError("unsupported operator Foo")

    monkeypatch.setattr(validation, "make_source", unsupported)
    with pytest.raises(GDWSError, match="no gradient source can differentiate.*Foo"):
        validate(model, model, data=data, attacks=("pgd",), steps=2)
