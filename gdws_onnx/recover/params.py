"""The float initializers a fine-tune trains, as torch Parameters of a replica, and written back.

`trainable_names(model, train)`: "rewritten" = the float initializers of the Conv/Gemm/MatMul
nodes a rewrite made (their names are in a `graph.pattern` scope: `<conv>/gdws/pw`, ...), their
biases included; "all" = every float initializer feeding a Conv, Gemm, MatMul or
BatchNormalization (a BatchNormalization's running mean and variance excepted: they are statistics,
not weights). `write_back` puts new values into a copy of the same graph; `check_same_graph` proves
that nothing but initializer values changed.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto

from gdws_onnx.errors import GDWSError, OptionError
from gdws_onnx.graph.pattern import layer_of

TRAIN_CHOICES = ("rewritten", "all")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "BatchNormalization")
BN_STATISTICS = (3, 4)  # BatchNormalization inputs: running mean, running variance


def is_rewritten(node: onnx.NodeProto) -> bool:
    """True for a node a rewrite made (its name lies in one of `graph.pattern.SCOPES`)."""
    return bool(node.name) and layer_of(node.name) != node.name


def trainable_names(model: onnx.ModelProto, train: str = "rewritten") -> list[str]:
    """The float32 initializers `train` selects, in initializer order; OptionError when none."""
    if train not in TRAIN_CHOICES:
        raise OptionError(f"{{0}} must be one of {', '.join(TRAIN_CHOICES)}, got {train!r}", "train")
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    chosen = set()
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or (train == "rewritten" and not is_rewritten(node)):
            continue
        for i, name in enumerate(node.input):
            if name in floats and not (node.op_type == "BatchNormalization" and i in BN_STATISTICS):
                chosen.add(name)
    if not chosen:
        if train == "rewritten":
            raise OptionError("the model has no rewritten layers to train (optimize it first, or pass {0})",
                              "train=all")
        raise GDWSError("the model has no float weights feeding Conv, Gemm, MatMul or BatchNormalization")
    return [t.name for t in model.graph.initializer if t.name in chosen]


def make_trainable(replica, names: list[str]) -> list:
    """Replace the replica's constants `names` by torch Parameters (float32, requires_grad) and
    return them in that order. The replica must run unfused (`fuse_gdws=False`): a fused GDWS
    chain caches its weight."""
    torch = replica.torch
    params = []
    for name in names:
        p = torch.nn.Parameter(replica.consts[name].detach().clone().to(torch.float32))
        replica.consts[name] = p
        params.append(p)
    return params


def write_back(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers `values` hold the new values (same name, dims, type,
    stored as raw data); everything else is the original's."""
    out = copy.deepcopy(model)
    left = dict(values)
    for t in out.graph.initializer:
        if t.name not in left:
            continue
        v = np.ascontiguousarray(left.pop(t.name), dtype=np.float32)
        if list(v.shape) != list(t.dims):
            raise GDWSError(f"initializer {t.name}: trained shape {list(v.shape)} != graph shape {list(t.dims)}")
        for f in ("float_data", "external_data"):
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
