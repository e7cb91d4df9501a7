"""A classifier model made ready for attacks: one input, one output, logits, a fixed batch."""

from __future__ import annotations

import copy

import onnx

from gdws_onnx.errors import GDWSError


def single_io(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    """(the input that is not an initializer, the output); GDWSError unless there is one of each."""
    inits = {t.name for t in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    if len(ins) != 1 or len(model.graph.output) != 1:
        raise GDWSError(f"attacks need a classifier with one input and one output; the model has "
                        f"{len(ins)} inputs and {len(model.graph.output)} outputs")
    return ins[0], model.graph.output[0]


def logits_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """A copy whose output is the logits: a terminal Softmax/LogSoftmax is cut off.

    Returns (model, cut). Argmax (accuracy) is unchanged by the cut; attack losses need logits."""
    m = copy.deepcopy(model)
    _, out = single_io(m)
    prod = [n for n in m.graph.node if out.name in n.output]
    if prod and prod[0].op_type in ("Softmax", "LogSoftmax"):
        node = prod[0]
        src = node.input[0]
        if sum(src in n.input for n in m.graph.node) == 1:  # only the softmax reads it
            m.graph.node.remove(node)
            for n in m.graph.node:
                for i, o in enumerate(n.output):
                    if o == src:
                        n.output[i] = out.name
            return m, True
    return m, False


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy with the input's and output's leading dimension fixed to `batch` (inferred shapes
    of intermediate values are dropped so they are recomputed)."""
    m = copy.deepcopy(model)
    x, y = single_io(m)
    for v in (x, y):
        dims = v.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = batch
    del m.graph.value_info[:]
    return m


def input_shape(model: onnx.ModelProto) -> tuple[list, int]:
    """(dims of the input, elem type); unknown dims are strings."""
    x, _ = single_io(model)
    return [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in x.type.tensor_type.shape.dim], \
        x.type.tensor_type.elem_type
