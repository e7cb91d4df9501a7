"""Gradients of INT8 (QDQ) models: QuantizeLinear/DequantizeLinear in the torch replica, the
clipped straight-through estimator (BPDA), its gate, and validate() adding Square over ORT."""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gdws_onnx import GDWSError, validate
from gdws_onnx.eval.attacks import AttackSettings, pgd
from gdws_onnx.eval.gradients import (
    BPDA_LOGITS_TOL,
    QDQ_OPS,
    OrtClassifier,
    TorchReplica,
    activation_quantizers,
    check_gradient_source,
    dequantized_surrogate,
    make_source,
)
from gdws_onnx.eval.gradients.qdq import DequantizedSurrogate
from gdws_onnx.eval.gradients.torch_ops import qparam
from validate_helpers import fashion, fm_cnn, op_model

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")

N = 64


def quantize_int8(model: onnx.ModelProto, calib: np.ndarray, activations: str = "s8") -> onnx.ModelProto:
    """ONNX Runtime static quantization: QDQ, per-channel QInt8 weights, QInt8/QUInt8 activations."""

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            name = model.graph.input[0].name
            self.batches = iter([{name: calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "f.onnx"), os.path.join(tmp, "q.onnx")
        onnx.save(model, src)
        quantization.quantize_static(
            src, dst, Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            weight_type=quantization.QuantType.QInt8,
            activation_type=quantization.QuantType.QInt8 if activations == "s8" else quantization.QuantType.QUInt8)
        return onnx.load(dst)


@pytest.fixture(scope="module")
def data(fashion_mnist):
    return fashion(N)


@pytest.fixture(scope="module")
def float_model(fashion_mnist):
    return fm_cnn(0)


def _calib() -> np.ndarray:
    return np.random.default_rng(0).random((64, 1, 28, 28)).astype(np.float32)  # random [0, 1] calibration


@pytest.fixture(scope="module")
def int8_model(float_model):
    return quantize_int8(float_model, _calib(), "s8")


@pytest.fixture(scope="module", params=["s8", "u8"])
def int8_both(request, float_model, int8_model):
    return int8_model if request.param == "s8" else quantize_int8(float_model, _calib(), "u8")


# ------------------------------------------------------------------ the operators

def _qdq_model(zp_dtype, per_axis: bool, zero_point: bool = True, opset: int = 19):
    """x -> QuantizeLinear -> DequantizeLinear (scalar or per-channel along axis 1)."""
    c = 3
    s = np.array([0.05, 0.1, 0.02], np.float32) if per_axis else np.float32(0.05)
    zp_val = {np.int8: [-3, 0, 5], np.uint8: [128, 100, 0]}[zp_dtype]
    zp = np.array(zp_val, zp_dtype) if per_axis else np.array(zp_val[0], zp_dtype)
    inits = {"s": s, **({"zp": zp} if zero_point else {})}
    qi = ["x", "s", "zp"] if zero_point else ["x", "s"]
    nodes = [helper.make_node("QuantizeLinear", qi, ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", *qi[1:]], ["z"], axis=1)]
    return op_model(nodes, inits, in_shape=("N", c, 4, 5), opset=opset)


def _tie_inputs(model, n=4, seed=0):
    """Inputs in both signs, far past saturation, and exactly on .5 rounding ties."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    s = inits["s"].reshape(-1)
    s = (s if s.size > 1 else np.repeat(s, 3)).reshape(1, 3, 1, 1)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-20, 20, (n, 3, 4, 5)).astype(np.float32)
    k = rng.integers(-60, 60, (n, 3, 4, 5))
    ties = ((k + 0.5) * s).astype(np.float32)
    exact = np.float32(ties / s) == (k + 0.5)  # keep ties float32 represents exactly
    return np.where(exact & (rng.random(x.shape) < 0.5), ties, x).astype(np.float32)


@pytest.mark.parametrize("zp_dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("per_axis", [False, True])
def test_quantize_dequantize_match_ort_and_the_pytorch_ste(zp_dtype, per_axis):
    m = _qdq_model(zp_dtype, per_axis)
    x = _tie_inputs(m)
    ref = OrtClassifier(m)(x)
    rep = TorchReplica(m)
    assert rep.bpda
    xt = torch.from_numpy(x).requires_grad_(True)
    out = rep(xt)
    assert np.array_equal(out.detach().numpy(), ref)  # round half to even, saturation: bit-exact
    # backward: PyTorch's own fake-quant straight-through estimator (QAT), gradient 1 inside the
    # integer range, 0 where it saturates
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    lo, hi = (-128, 127) if zp_dtype == np.int8 else (0, 255)
    xo = torch.from_numpy(x).requires_grad_(True)
    if per_axis:
        oracle = torch.fake_quantize_per_channel_affine(
            xo, torch.from_numpy(inits["s"].copy()), torch.from_numpy(inits["zp"].astype(np.int32)), 1, lo, hi)
    else:
        oracle = torch.fake_quantize_per_tensor_affine(xo, float(inits["s"]), int(inits["zp"]), lo, hi)
    adj = torch.from_numpy(np.random.default_rng(1).standard_normal(out.shape).astype(np.float32))
    (g,) = torch.autograd.grad(out, xt, adj)
    (go,) = torch.autograd.grad(oracle.reshape(out.shape), xo, adj)
    assert torch.equal(g == 0, go == 0) and torch.allclose(g, go, rtol=1e-6, atol=0)  # (adj / s) * s
    assert 0 < int((g == 0).sum()) < g.numel()  # both regions exercised


def test_quantize_without_zero_point_is_uint8_and_weights_fold():
    m = _qdq_model(np.uint8, per_axis=False, zero_point=False, opset=13)
    x = _tie_inputs(m)
    assert np.array_equal(TorchReplica(m)(torch.from_numpy(x)).numpy(), OrtClassifier(m)(x))
    # int8 weight -> DequantizeLinear (per output channel, axis 0) and an int32 bias: evaluated once,
    # no straight-through estimate needed: exact gradients, the ordinary name and gate
    rng = np.random.default_rng(0)
    inits = {"wq": rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8),
             "ws": (rng.random(4) * 0.01 + 0.001).astype(np.float32), "wz": np.zeros(4, np.int8),
             "bq": rng.integers(-500, 500, 4).astype(np.int32), "bs": np.float32(1e-3)}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"]),
             helper.make_node("Conv", ["x", "w", "b"], ["z"], pads=[1, 1, 1, 1])]
    wm = op_model(nodes, inits, in_shape=("N", 3, 6, 6))
    rep = TorchReplica(wm)
    assert not rep.bpda and [n.op_type for n in rep.nodes] == ["Conv", "Flatten"]
    assert not activation_quantizers(wm)
    x = rng.random((2, 3, 6, 6)).astype(np.float32)
    assert np.abs(rep(torch.from_numpy(x)).numpy() - OrtClassifier(wm)(x)).max() < 1e-5
    src = make_source(wm, "torch")
    assert src.name == "torch" and not src.bpda
    chk = check_gradient_source(src, OrtClassifier(wm), x, np.zeros(2, np.int64))
    assert chk.passed and not chk.bpda and chk.fd_reference == "onnxruntime"


def test_qdq_op_list():
    assert set(QDQ_OPS) == {"QuantizeLinear", "DequantizeLinear"}
    m = op_model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], block_size=2, axis=1),
                  helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["z"], block_size=2, axis=1)],
                 {"s": np.full((2, 2, 4, 4), 0.1, np.float32), "zp": np.zeros((2, 2, 4, 4), np.int8)},
                 in_shape=(2, 4, 4, 4), opset=21)
    with pytest.raises(GDWSError, match="block"):
        TorchReplica(m)(torch.zeros(2, 4, 4, 4))
    m4 = op_model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                   helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["z"])],
                  {"s": np.float32(0.1)}, in_shape=(2, 4, 4, 4), opset=21)
    m4.graph.initializer.append(helper.make_tensor("zp", TensorProto.INT4, [], [1]))
    with pytest.raises(GDWSError, match="INT4"):
        TorchReplica(m4)


# ------------------------------------------------------------------ a quantized classifier

def test_replica_matches_ort_int8_kernels_and_passes_the_bpda_gate(int8_both, data):
    int8_model = int8_both
    x, y = data
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8_model.graph.node}
    ort = OrtClassifier(int8_model)
    src = make_source(int8_model, "torch")
    assert src.bpda and src.name == "torch-bpda"
    ref = ort(x)
    err = np.abs(src.forward(x) - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= BPDA_LOGITS_TOL, err
    assert np.mean(src.forward(x).argmax(1) == ref.argmax(1)) >= 0.98
    chk = check_gradient_source(src, ort, x[:8], y[:8])
    assert chk.passed, chk.message
    assert chk.bpda and "BPDA" in chk.message and "surrogate" in chk.fd_reference
    # the surrogate is float: no Q/DQ left, and close to the quantized model
    sur = dequantized_surrogate(int8_model)
    assert not {n.op_type for n in sur.graph.node} & set(QDQ_OPS)
    assert np.mean(OrtClassifier(sur)(x).argmax(1) == ref.argmax(1)) >= 0.9


def test_dequantized_surrogate_is_a_pass(float_model, int8_model):
    """The pass convention: `call` edits the model it is given and reports what it did; the
    function leaves its input alone; a float model is not modified."""
    m = copy.deepcopy(int8_model)
    res = DequantizedSurrogate().call(m)
    assert res.model is m and res.modified
    assert res.report.activations_clamped == len(activation_quantizers(int8_model)) > 0
    assert res.report.constants_evaluated > 0
    assert not {n.op_type for n in m.graph.node} & set(QDQ_OPS)
    assert {n.op_type for n in int8_model.graph.node} >= set(QDQ_OPS)  # the copy was edited, not the fixture
    assert dequantized_surrogate(int8_model).graph == m.graph
    f = copy.deepcopy(float_model)
    res = DequantizedSurrogate().call(f)
    assert not res.modified and res.model.graph == float_model.graph


class _Unclipped:
    """The 'identity everywhere' straight-through estimator: it ignores the saturation that
    stands for the Relu the quantizer removed."""

    def __init__(self, src):
        self.src, self.bpda, self.name, self.surrogate = src, True, "unclipped", src.surrogate
        replica = src.replica
        orig = replica._quantize

        def quantize(ins, a):
            out = orig(ins, a)
            if not ins[0].requires_grad:
                return out
            v = ins[0] / qparam(ins[1].to(ins[0].dtype), ins[0], a)
            return out.detach() + (v - v.detach())

        replica._quantize = quantize

    def forward(self, x):
        return self.src.forward(x)

    def vjp(self, x, adj):
        return self.src.vjp(x, adj)

    def ce_grad(self, x, y):
        return self.src.ce_grad(x, y)


def test_bpda_gate_rejects_a_straight_through_estimator_that_ignores_saturation(int8_model, data):
    x, y = data[0][:8], data[1][:8]
    bad = check_gradient_source(_Unclipped(make_source(int8_model, "torch")), OrtClassifier(int8_model), x, y)
    assert not bad.passed and "surrogate" in bad.message


def test_ste_gradient_drives_pgd_on_the_quantized_model(float_model, int8_model, data):
    x, y = data[0][:40], data[1][:40]
    q_ort = OrtClassifier(int8_model)
    src = make_source(int8_model, "torch")
    _, g = src.ce_grad(x, y)
    assert np.all(np.isfinite(g)) and np.all(np.abs(g.reshape(len(g), -1)).max(1) > 0)
    settings = AttackSettings(eps=0.1, steps=5)
    clean_f = np.mean(OrtClassifier(float_model)(x).argmax(1) == y)
    rob_f = pgd(OrtClassifier(float_model), make_source(float_model, "torch"), x, y, settings).robust.mean()
    clean_q = np.mean(q_ort(x).argmax(1) == y)
    res = pgd(q_ort, src, x, y, settings)
    assert rob_f < clean_f - 0.4  # the task: PGD breaks the float model
    assert clean_q > 0.6 and res.robust.mean() < clean_q - 0.4, (clean_q, res.robust.mean())
    assert res.robust.mean() <= rob_f + 0.1
    assert np.abs(res.x_adv - x).max() <= 0.1 + 1e-6


def test_onnx_ad_refuses_qdq_models(int8_model):
    pytest.importorskip("onnx_ad")
    with pytest.raises(GDWSError, match="straight-through"):
        make_source(int8_model, "onnx-ad")


@pytest.mark.slow
def test_validate_float_vs_int8_adds_square_and_labels_bpda(float_model, int8_model, data):
    x, y = data[0][:32], data[1][:32]
    r = validate(float_model, int8_model, x=x, y=y, eps=0.05, steps=5, queries=50)
    assert r.original.gradient_source == "torch" and r.optimized.gradient_source == "torch-bpda"
    assert r.optimized.gradient_check["bpda"] and not r.original.gradient_check["bpda"]
    for res in (r.original, r.optimized):
        assert set(res.robust_accuracy_by_attack) == {"pgd", "square"}
        assert res.robust_accuracy <= min(res.robust_accuracy_by_attack.values())
    assert any("straight-through (BPDA)" in w and w.startswith("optimized") for w in r.warnings)
    assert [a["name"] for a in r.attacks] == ["pgd", "square"] and "added" in r.attacks[1]
    assert "torch-bpda" in r.to_json()
