"""Models and data for the validate / gradients tests (no training framework needed)."""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VGG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "vgg_small_fgsm.onnx")


@functools.lru_cache(maxsize=None)
def fashion(n: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """First n Fashion-MNIST samples. Real data only: a test calling this (or fm_cnn, trained on
    it) requests the `fashion_mnist` fixture, which skips when the data set is not installed;
    without it the loader's DataError names the Debian package."""
    from gdws_onnx.data import load_fashion_mnist

    x, y = load_fashion_mnist(split)
    return x[:n].copy(), y[:n].copy()


def _feature_model(seed: int) -> tuple[list, list, int]:
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((8, 1, 5, 5)) / 5).astype(np.float32)
    w1 = (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72)).astype(np.float32)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(np.zeros(8, np.float32), "b0"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(16, np.float32), "b1")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[5, 5],
                              strides=[2, 2], pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                              strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p1"], ["feat"], name="flatten")]
    return nodes, inits, 16 * 3 * 3 + 0  # 7x7 -> pool 3x3


def _model(nodes, inits, out, classes=10, batch="N") -> onnx.ModelProto:
    m = helper.make_model(
        helper.make_graph(nodes, "fm_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 28, 28])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, classes])], inits),
        opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    m.ir_version = 8
    return m


@functools.lru_cache(maxsize=None)
def fm_cnn_bytes(seed: int = 0, softmax: bool = False) -> bytes:
    """A small Conv/Relu/MaxPool/Gemm Fashion-MNIST classifier: random conv features and a
    ridge-regression Gemm fitted on 4000 training images (about 75-80% clean accuracy)."""
    from gdws_onnx.runtime.session import make_session

    nodes, inits, _ = _feature_model(seed)
    feat_model = _model(nodes, inits, "feat", classes=144)
    x, y = fashion(4000, "train")
    f = make_session(feat_model).run(None, {"x": x})[0].astype(np.float64)
    f1 = np.concatenate([f, np.ones((len(f), 1))], 1)
    t = np.eye(10)[y] * 2 - 1
    coef = np.linalg.solve(f1.T @ f1 + 1.0 * np.eye(f1.shape[1]), f1.T @ t)
    w = coef[:-1].T.astype(np.float32) * 4  # sharper logits
    b = coef[-1].astype(np.float32) * 4
    inits = inits + [numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(b, "fc_b")]
    nodes = nodes + [helper.make_node("Gemm", ["feat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1))
        out = "prob"
    return _model(nodes, inits, out).SerializeToString()


def fm_cnn(seed: int = 0, softmax: bool = False) -> onnx.ModelProto:
    return onnx.load_from_string(fm_cnn_bytes(seed, softmax))


def gdws_of(model: onnx.ModelProto, error_budget: float = 0.05) -> onnx.ModelProto:
    """The GDWS-rewritten model (every eligible conv, the first included)."""
    from gdws_onnx import optimize

    out, report = optimize(model, error_budget=error_budget, force=True, skip_first=False, verify=False, target="macs")
    assert report.rewritten, "nothing was rewritten"
    return out


def op_model(nodes, inits, in_shape=(2, 3, 8, 8), opset: int = 17, extra_inputs=()) -> onnx.ModelProto:
    """x -> nodes (last output 'z') -> Flatten -> y, shapes inferred; for per-operator parity."""
    nodes = list(nodes) + [helper.make_node("Flatten", ["z"], ["y"], name="flat_out")]
    g = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    vi = {v.name: v for v in inferred.graph.value_info}
    vi.update({o.name: o for o in inferred.graph.output})
    m.graph.output[0].CopyFrom(vi["y"])
    return m
