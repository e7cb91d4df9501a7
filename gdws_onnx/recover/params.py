"""The float initializers a fine-tune trains, as torch Parameters of a replica, and written back.

`trainable_names(model, train)`: "rewritten" = the float initializers of the Conv/Gemm/MatMul
nodes a rewrite made (their names are in a `graph.pattern` scope: `<conv>/gdws/pw`, ...), their
biases included; "all" = every float initializer feeding a Conv, Gemm, MatMul or
BatchNormalization (a BatchNormalization's running mean and variance excepted: they are statistics,
not weights). In a QDQ graph a weight is an integer initializer behind a DequantizeLinear
(`quantized.py`): it is trained as a float master copy, fake-quantized on its grid.
`write_back` puts new values into a copy of the same graph (the integers of a quantized one);
`check_same_graph` proves that nothing but initializer values changed.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto

from gdws_onnx.errors import GDWSError, OptionError
from gdws_onnx.graph.pattern import layer_of
from gdws_onnx.recover.quantized import QuantizedWeight, quantized_weights

TRAIN_CHOICES = ("rewritten", "all")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "BatchNormalization")
BN_STATISTICS = (3, 4)  # BatchNormalization inputs: running mean, running variance


def is_rewritten(node: onnx.NodeProto) -> bool:
    """True for a node a rewrite made (its name lies in one of `graph.pattern.SCOPES`)."""
    return bool(node.name) and layer_of(node.name) != node.name


def quantized_sources(model: onnx.ModelProto) -> dict[str, list[QuantizedWeight]]:
    """The integer initializers behind constant DequantizeLinear nodes, by initializer name."""
    out: dict[str, list[QuantizedWeight]] = {}
    for qw in quantized_weights(model).values():
        out.setdefault(qw.source, []).append(qw)
    return out


def trainable_names(model: onnx.ModelProto, train: str = "rewritten") -> list[str]:
    """The float32 initializers `train` selects, and the integer ones behind the DequantizeLinear
    a weight op reads in a QDQ graph, in initializer order; OptionError when none."""
    if train not in TRAIN_CHOICES:
        raise OptionError(f"{{0}} must be one of {', '.join(TRAIN_CHOICES)}, got {train!r}", "train")
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    dequantized = {qw.output: qw.source for qw in quantized_weights(model).values()}
    chosen = set()
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or (train == "rewritten" and not is_rewritten(node)):
            continue
        for i, name in enumerate(node.input):
            if node.op_type == "BatchNormalization" and i in BN_STATISTICS:
                continue
            if name in floats:
                chosen.add(name)
            elif name in dequantized:
                chosen.add(dequantized[name])
    if not chosen:
        if train == "rewritten":
            raise OptionError("the model has no rewritten layers to train (optimize it first, or pass {0})",
                              "train=all")
        raise GDWSError("the model has no float or quantized weights feeding Conv, Gemm, MatMul or BatchNormalization")
    return [t.name for t in model.graph.initializer if t.name in chosen]


def make_trainable(replica, names: list[str]) -> list:
    """Replace the replica's constants `names` by torch Parameters (float32, requires_grad) and
    return them in that order; an integer initializer behind DequantizeLinear becomes a float
    master copy of its dequantized value, which the replica sees fake-quantized
    (`QuantizedWeight.fake_quantize`). The replica must run unfused (`fuse_gdws=False`): a fused
    GDWS chain caches its weight."""
    torch = replica.torch
    quantized = quantized_sources(replica.model)
    params = []
    for name in names:
        if name in quantized:
            first = quantized[name][0]
            p = torch.nn.Parameter(replica.consts[first.output].detach().clone().to(torch.float32))
            for qw in quantized[name]:
                replica.derived[qw.output] = (lambda q=qw, w=p: q.fake_quantize(torch, w))
        else:
            p = torch.nn.Parameter(replica.consts[name].detach().clone().to(torch.float32))
            replica.consts[name] = p
        params.append(p)
    return params


def write_back(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers `values` hold the new values (same name, dims, type,
    stored as raw data): float ones as they are, integer ones behind DequantizeLinear as the
    integers of their fake-quantized value; everything else is the original's."""
    out = copy.deepcopy(model)
    quantized = quantized_sources(model)
    left = dict(values)
    for t in out.graph.initializer:
        if t.name not in left:
            continue
        v = left.pop(t.name)
        if t.name in quantized:
            v = quantized[t.name][0].integers(np.asarray(v, np.float32))
        v = np.ascontiguousarray(v, dtype=np.float32 if t.name not in quantized else v.dtype)
        if list(v.shape) != list(t.dims):
            raise GDWSError(f"initializer {t.name}: trained shape {list(v.shape)} != graph shape {list(t.dims)}")
        for f in ("float_data", "int32_data", "external_data"):
            t.ClearField(f)
        t.data_location = TensorProto.DEFAULT
        t.raw_data = v.tobytes()
    if left:
        raise GDWSError(f"no initializer named {', '.join(sorted(left))} in the model")
    return out


def _structure(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every initializer's value removed (name, dims, type kept)."""
    m = copy.deepcopy(model)
    for t in m.graph.initializer:
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data", "external_data"):
            t.ClearField(f)
        t.data_location = TensorProto.DEFAULT
    return m


def check_same_graph(original: onnx.ModelProto, trained: onnx.ModelProto) -> None:
    """GDWSError unless `trained` is `original` but for initializer values: nodes, names, inputs,
    outputs, initializer names/dims/types, IR version, opsets, producer and metadata equal."""
    a, b = _structure(original), _structure(trained)
    if a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True):
        return
    what = [k for k, (x, y) in {
        "IR version": (a.ir_version, b.ir_version),
        "opsets": (list(a.opset_import), list(b.opset_import)),
        "metadata": (list(a.metadata_props), list(b.metadata_props)),
        "nodes": (list(a.graph.node), list(b.graph.node)),
        "inputs/outputs": (list(a.graph.input) + list(a.graph.output), list(b.graph.input) + list(b.graph.output)),
        "initializers": (list(a.graph.initializer), list(b.graph.initializer)),
    }.items() if x != y]
    raise GDWSError(f"the fine-tuned graph differs from its input beyond initializer values ({', '.join(what) or 'other fields'})")
