"""Small ONNX models for tests: one Conv in every form ONNX allows, built with onnx.helper."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
WEIGHT_SOURCES = ("initializer", "constant", "fp16_cast")


@dataclass
class ConvCase:
    """One Conv configuration of the fuzz corpus."""

    kernel: tuple[int, ...]
    in_channels: int
    out_channels: int
    group: int = 1
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    bias: bool = True
    weight_source: str = "initializer"
    fp16: bool = False
    dynamic_batch: bool = False
    spatial: tuple[int, ...] = field(default=())
    relu_after: bool = False
    seed: int = 0

    @property
    def nd(self) -> int:
        return len(self.kernel)


def random_case(rng: np.random.Generator, seed: int) -> ConvCase:
    """A random Conv form: 1-3 spatial dims, strides, pads/auto_pad, dilations, groups, bias,
    weight as initializer / Constant node / fp16 initializer + Cast, fp16 models, dynamic batch."""
    nd = int(rng.choice([1, 2, 2, 2, 3]))
    while True:
        kernel = tuple(int(k) for k in rng.integers(1, 5 if nd < 3 else 4, size=nd))
        if np.prod(kernel) > 1:
            break
    group = int(rng.choice([1, 1, 1, 2, 3]))
    cg = int(rng.integers(1, 5))  # 1: one input channel per group (first convs, dw multipliers)
    mg = int(rng.integers(1 if cg > 1 else 2, 7))  # includes M/groups < K (rank = min(M/g, K))
    dil = tuple(int(d) for d in rng.choice([1, 1, 2], size=nd))
    strides = tuple(int(s) for s in rng.choice([1, 1, 2, 3], size=nd))
    auto_pad = str(rng.choice(AUTO_PADS))
    pads = tuple(int(p) for p in rng.integers(0, 3, size=2 * nd)) if auto_pad == "NOTSET" else ()
    if auto_pad.startswith("SAME"):  # ONNX Runtime rejects SAME_* with dilation > 1
        dil = (1,) * nd
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    low = 3 if nd == 3 else 5
    spatial = tuple(int(e + rng.integers(0, low + 4)) for e in eff)
    return ConvCase(kernel=kernel, in_channels=group * cg, out_channels=group * mg, group=group,
                    strides=strides, dilations=dil, pads=pads, auto_pad=auto_pad,
                    bias=bool(rng.random() < 0.6), weight_source=str(rng.choice(WEIGHT_SOURCES)),
                    fp16=bool(rng.random() < 0.15), dynamic_batch=bool(rng.random() < 0.4),
                    spatial=spatial, relu_after=bool(rng.random() < 0.3), seed=seed)


def conv_model(case: ConvCase, opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """A model computing x -> Conv(case) [-> Relu] -> y."""
    rng = np.random.default_rng(case.seed)
    dtype = np.float16 if case.fp16 else np.float32
    elem = TensorProto.FLOAT16 if case.fp16 else TensorProto.FLOAT
    w = rng.standard_normal((case.out_channels, case.in_channels // case.group, *case.kernel))
    nodes, inits = [], []
    if case.weight_source == "initializer":
        inits.append(numpy_helper.from_array(w.astype(dtype), "W"))
    elif case.weight_source == "constant":
        nodes.append(helper.make_node("Constant", [], ["W"], name="W_const",
                                      value=numpy_helper.from_array(w.astype(dtype), "W_value")))
    else:  # stored in fp16, cast to the compute type by a constant-foldable subgraph
        inits.append(numpy_helper.from_array(w.astype(np.float16), "W_half"))
        nodes.append(helper.make_node("Cast", ["W_half"], ["W"], name="W_cast", to=elem))
    inputs = ["x", "W"]
    if case.bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(case.out_channels).astype(dtype), "B"))
        inputs.append("B")
    attrs = dict(kernel_shape=list(case.kernel), group=case.group)
    if case.strides:
        attrs["strides"] = list(case.strides)
    if case.dilations:
        attrs["dilations"] = list(case.dilations)
    if case.auto_pad != "NOTSET":
        attrs["auto_pad"] = case.auto_pad
    elif case.pads:
        attrs["pads"] = list(case.pads)
    conv_out = "conv_out" if case.relu_after else "y"
    nodes.append(helper.make_node("Conv", inputs, [conv_out], name="conv", **attrs))
    if case.relu_after:
        nodes.append(helper.make_node("Relu", [conv_out], ["y"], name="relu"))
    batch = "N" if case.dynamic_batch else 2
    x = helper.make_tensor_value_info("x", elem, [batch, case.in_channels, *case.spatial])
    y = helper.make_tensor_value_info("y", elem, [batch, case.out_channels, *(f"s{i}" for i in range(case.nd))])
    model = helper.make_model(helper.make_graph(nodes, "conv_case", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = ir_version
    return model


def small_cnn(seed: int = 0, channels: tuple[int, ...] = (8, 16, 16), classes: int = 10,
              size: int = 12, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Conv-Relu stack -> global average pool -> Gemm logits; input x: (N, 3, size, size)."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, c_in = [], [], "x", 3
    for i, c in enumerate(channels):
        inits += [numpy_helper.from_array((rng.standard_normal((c, c_in, 3, 3)) / np.sqrt(9 * c_in))
                                          .astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev, c_in = f"r{i}", c
    inits += [numpy_helper.from_array(rng.standard_normal((classes, c_in)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    batch = "N" if dynamic_batch else 1
    model = helper.make_model(
        helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [batch, 3, size, size])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], inits),
        opset_imports=[helper.make_opsetid("", 17)], producer_name="tests", producer_version="1.0")
    model.ir_version = 8
    return model



def annotated_cnn() -> onnx.ModelProto:
    """small_cnn with what an optimizer must keep: IR 7, a second opset, producer, doc string, metadata."""
    model = small_cnn()
    model.ir_version = 7
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model.producer_name, model.producer_version, model.doc_string = "me", "9.9", "doc"
    helper.set_model_props(model, {"author": "x", "license": "y"})
    return model


def assert_model_info_kept(out: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """`out` has `model`'s IR version, opsets, producer, doc string, metadata and I/O (names, types, shapes)."""
    assert out.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert (out.producer_name, out.producer_version, out.doc_string) == \
        (model.producer_name, model.producer_version, model.doc_string)
    assert {p.key: p.value for p in out.metadata_props} == {p.key: p.value for p in model.metadata_props}
    assert [i.SerializeToString() for i in out.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in out.graph.output] == [o.SerializeToString() for o in model.graph.output]

# ----------------------------------------------------------------------------- tiny classifier (sensitivity)

TINY_CLASSES = 4


def _tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "wa": rng.standard_normal((4, 3, 3, 3)) / 4, "ba": rng.standard_normal(4) / 10,
        "bn_s": 1 + rng.random(4), "bn_b": rng.standard_normal(4) / 10,
        "bn_m": rng.standard_normal(4) / 5, "bn_v": 0.5 + rng.random(4),
        "wb": rng.standard_normal((6, 2, 3, 3)) / 3, "bb": rng.standard_normal(6) / 10,  # group 2
        "wc": rng.standard_normal((5, 6, 2, 2)) / 3,
        "fc": rng.standard_normal((TINY_CLASSES, 5 * 2 * 2)), "fcb": rng.standard_normal(TINY_CLASSES) / 10,
    }


def tiny_model(seed: int = 0, constant_wb: bool = False) -> onnx.ModelProto:
    """A tiny classifier with every conv geometry the sensitivity code must get right:
    x (N,3,6,6) -> Conv A (dilation 2) -> BatchNorm -> Relu -> Conv B (group 2, stride 2, asymmetric
    pads) -> Relu -> Conv C (SAME_UPPER, no bias) -> Relu -> MaxPool -> Flatten -> Gemm: 4 logits."""
    w = {k: v.astype(np.float32) for k, v in _tiny_weights(seed).items()}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items() if not (constant_wb and k == "wb")]
    nodes = []
    if constant_wb:
        nodes.append(helper.make_node("Constant", [], ["wb"], name="wb_const",
                                      value=numpy_helper.from_array(w["wb"], "wb_value")))
    nodes += [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", kernel_shape=[3, 3],
                         dilations=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("BatchNormalization", ["a", "bn_s", "bn_b", "bn_m", "bn_v"], ["an"], name="bn"),
        helper.make_node("Relu", ["an"], ["ar"], name="relu_a"),
        helper.make_node("Conv", ["ar", "wb", "bb"], ["b"], name="conv_b", kernel_shape=[3, 3], group=2,
                         strides=[2, 2], pads=[1, 0, 0, 1]),
        helper.make_node("Relu", ["b"], ["br"], name="relu_b"),
        helper.make_node("Conv", ["br", "wc"], ["c"], name="conv_c", kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c"], ["cr"], name="relu_c"),
        helper.make_node("MaxPool", ["cr"], ["p"], name="pool", kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", TINY_CLASSES])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def tiny_inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 6, 6)).astype(np.float32)


# ----------------------------------------------------------------------------- models that defeat a check


def input_blind_cnn(seed: int = 0, two_outputs: bool = False) -> onnx.ModelProto:
    """small_cnn whose first conv's bias of -1e4 makes its Relu output zero for inputs in [0, 1), and
    whose other conv biases are zero: the logits are the Gemm's bias for every such input, with the
    original and any rewrite of the later convs alike (like the light-zoo models: "max abs 0, top-1
    agreement 100 %" that proves nothing). With `two_outputs`, a second output `x_mean` (the
    input's mean) does depend on the input."""
    model = small_cnn(seed)
    for t in model.graph.initializer:
        if t.name in ("b0", "b1", "b2", "fc_b"):
            value = {"b0": -1e4, "fc_b": np.linspace(-1, 1, t.dims[0])}.get(t.name, 0.0)
            t.CopyFrom(numpy_helper.from_array(np.broadcast_to(value, tuple(t.dims)).astype(np.float32), t.name))
    if two_outputs:
        model.graph.node.append(helper.make_node("ReduceMean", ["x"], ["x_mean"], name="x_mean", keepdims=0))
        model.graph.output.append(helper.make_tensor_value_info("x_mean", TensorProto.FLOAT, []))
    return model


def padded_cnn(pads_from: str = "constants", size: int = 28, dynamic_hw: bool = False,
               opaque: bool = False) -> onnx.ModelProto:
    """x (N, 1, size, size) -> Pad -> Conv 3x3 -> Relu -> Conv 3x3 -> Relu -> Conv 3x3: the pads of the
    Pad are computed by a subgraph that ONNX shape inference does not evaluate, so it leaves every
    conv's output size unknown.

    pads_from: "constants": torch's F.pad export (Constant -> ConstantOfShape / Concat -> Reshape ->
    Slice -> Transpose -> Reshape -> Cast), pads 2 on every side; "input_shape": pads after the
    end of H and W of (size mod 4) (Shape -> Slice -> Mod -> Concat after ConstantOfShape zeros),
    which only a run can resolve. dynamic_hw: the input's H and W are named, not fixed. opaque: a custom-domain
    op (which neither shape inference nor ONNX Runtime knows) sits before the Pad."""
    rng = np.random.default_rng(3)
    i64 = TensorProto.INT64

    def const(name, values):
        return helper.make_node("Constant", [], [name], name=name,
                                value=numpy_helper.from_array(np.asarray(values, np.int64), name + "_value"))

    nodes, src = [], "x"
    if opaque:
        nodes.append(helper.make_node("Mystery", ["x"], ["x_op"], name="mystery", domain="com.example"))
        src = "x_op"
    if pads_from == "constants":
        nodes += [const("pad_rank", [4]), const("pad_hw", [2, 2, 2, 2]),
                  helper.make_node("ConstantOfShape", ["pad_rank"], ["pad_zeros"], name="pad_zeros",
                                   value=helper.make_tensor("zero", i64, [1], [0])),
                  helper.make_node("Concat", ["pad_hw", "pad_zeros"], ["pad_cat"], name="pad_cat", axis=0),
                  const("pad_pairs", [-1, 2]),
                  helper.make_node("Reshape", ["pad_cat", "pad_pairs"], ["pad_2d"], name="pad_2d"),
                  const("sl_start", [-1]), const("sl_end", [-(2**63) + 1]), const("sl_axes", [0]),
                  const("sl_step", [-1]),
                  helper.make_node("Slice", ["pad_2d", "sl_start", "sl_end", "sl_axes", "sl_step"], ["pad_rev"],
                                   name="pad_rev"),
                  helper.make_node("Transpose", ["pad_rev"], ["pad_t"], name="pad_t", perm=[1, 0]),
                  const("flat", [-1]),
                  helper.make_node("Reshape", ["pad_t", "flat"], ["pad_flat"], name="pad_flat"),
                  helper.make_node("Cast", ["pad_flat"], ["pads"], name="pads_cast", to=i64)]
    elif pads_from == "input_shape":
        nodes += [helper.make_node("Shape", [src], ["x_shape"], name="x_shape"),
                  const("hw_start", [2]), const("hw_end", [4]),
                  helper.make_node("Slice", ["x_shape", "hw_start", "hw_end"], ["x_hw"], name="x_hw"),
                  const("four", [4]),
                  helper.make_node("Mod", ["x_hw", "four"], ["hw_rem"], name="hw_rem"),
                  const("six", [6]),
                  helper.make_node("ConstantOfShape", ["six"], ["zeros6"], name="zeros6",
                                   value=helper.make_tensor("zero", i64, [1], [0])),
                  helper.make_node("Concat", ["zeros6", "hw_rem"], ["pads"], name="pads_cat", axis=0)]
    else:
        raise ValueError(pads_from)
    nodes.append(helper.make_node("Pad", [src, "pads"], ["xp"], name="pad", mode="constant"))
    inits, prev, c_in = [], "xp", 1
    for i, c in enumerate((4, 8, 8)):
        inits += [numpy_helper.from_array((rng.standard_normal((c, c_in, 3, 3)) / 3).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(c) / 10).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[0, 0, 0, 0] if i == 0 else [1, 1, 1, 1]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
        c_in = c
    hw = ["H", "W"] if dynamic_hw else [size, size]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, *hw])
    y = helper.make_tensor_value_info("c2", TensorProto.FLOAT, ["N", 8, "h", "w"])
    graph = helper.make_graph(nodes, "padded_cnn", [x], [y], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.example", 1)] if opaque else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests")
    model.ir_version = 8
    return model
