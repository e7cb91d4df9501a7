"""The ONNX realization of Tucker-2 (`core/tucker.py`): which convs it applies to, and the
subgraph `<conv>/tucker/first` (1x1, C -> r1) -> `<conv>/tucker/core` (the conv's kernel,
strides, pads and dilations, r1 -> r2) -> `<conv>/tucker/last` (1x1, r2 -> M, the conv's bias)
that replaces a conv (spliced in by `graph.rewrite.replace_convs`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gdws_onnx.graph import pattern
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.graph.rewrite import Names

SCOPE = "tucker"


def tucker_skip_reason(conv: ConvSite) -> str | None:
    """Why Tucker-2 cannot realize a conv (None: it can): a constant weight, group 1, a spatial
    kernel, and a known input size (its first 1x1 conv runs at the input's size)."""
    if conv.weight is None:
        return conv.weight_source
    if conv.group != 1:
        return f"grouped conv (group={conv.group}; Tucker-2 needs group=1)"
    if conv.kernel_size == 1:
        return "1x1 conv (no spatial kernel: Tucker-2 is plain low rank there)"
    if conv.in_spatial is None:
        return "input spatial shape unknown (give input_shapes)"
    return None


def tucker_subgraph(site: ConvSite, first: np.ndarray, core: np.ndarray, last: np.ndarray, names: Names
                    ) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """x -> 1x1 Conv (first) -> Conv (core: the conv's spatial attributes) -> 1x1 Conv (last, bias)."""
    conv = site.node

    def name(role: str) -> str:
        return names.fresh(pattern.node_name(site.name, role, scope=SCOPE))

    ones = [1] * len(site.kernel_shape)
    w1, w2, w3 = (numpy_helper.from_array(a, name(f"{role}_weight"))
                  for a, role in ((first, "first"), (core, "core"), (last, "last")))
    t1, t2 = name("first_out"), name("core_out")
    spatial = dict(kernel_shape=list(site.kernel_shape), strides=list(site.strides), dilations=list(site.dilations))
    if site.auto_pad == "NOTSET":
        spatial["pads"] = list(site.pads)
    else:
        spatial["auto_pad"] = site.auto_pad
    bias = [conv.input[2]] if len(conv.input) > 2 and conv.input[2] else []
    nodes = [helper.make_node("Conv", [conv.input[0], w1.name], [t1], name=name("first"), kernel_shape=ones),
             helper.make_node("Conv", [t1, w2.name], [t2], name=name("core"), **spatial),
             helper.make_node("Conv", [t2, w3.name, *bias], [conv.output[0]], name=name("last"), kernel_shape=ones)]
    return [w1, w2, w3], nodes
