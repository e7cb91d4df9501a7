"""The ONNX realization of spatial SVD (`core/spatial_svd.py`): which convs it applies to, their
explicit geometry, and the two-conv subgraph `<conv>/ssvd/a` (k_h x 1) -> `<conv>/ssvd/b` (1 x k_w)
that replaces a conv (spliced in by `graph.rewrite.replace_convs`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gdws_onnx.core.geometry import out_spatial, resolved_pads
from gdws_onnx.core.spatial_svd import SpatialGeometry
from gdws_onnx.graph import pattern
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.graph.rewrite import Names


def ssvd_skip_reason(conv: ConvSite, need_size: bool = True) -> str | None:
    """Why spatial SVD cannot realize a conv (None: it can): a constant 2-D weight, group 1, a
    spatial kernel, and (`need_size`) a known input size."""
    if conv.weight is None:
        return conv.weight_source
    nd = conv.weight.ndim - 2
    if nd != 2:
        return f"{nd}-D conv (spatial SVD splits 2-D kernels only)"
    if conv.group != 1:
        kind = "depthwise" if conv.in_channels == conv.group else "grouped"
        return f"{kind} conv (group={conv.group}; spatial SVD needs group=1)"
    if conv.kernel_size == 1:
        return "1x1 conv (no spatial kernel to split)"
    if need_size and conv.in_spatial is None:
        return "input spatial shape unknown (give input_shapes)"
    return None


def geometry(site: ConvSite) -> SpatialGeometry:
    """Explicit pads and sizes of a 2-D conv with known input size (`core.geometry`)."""
    pads = resolved_pads(site.in_spatial, site.kernel_shape, site.strides, site.pads, site.dilations, site.auto_pad)
    out_h, out_w = out_spatial(site.in_spatial, site.kernel_shape, site.strides, pads, site.dilations)
    return SpatialGeometry(*site.in_spatial, out_h, out_w, tuple(pads))


def ssvd_subgraph(site: ConvSite, a: np.ndarray, b: np.ndarray, geo: SpatialGeometry, names: Names
                   ) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The realization of one conv at factors (A, B) (`core.spatial_svd.spatial_factors`):
    x -> Conv A (kh x 1, vertical stride/dilation/pads) -> Conv B (1 x kw, horizontal ones, bias)."""
    conv = site.node
    (sh, sw), (dh, dw), (kh, kw) = site.strides, site.dilations, site.kernel_shape
    top, left, bottom, right = geo.pads

    def name(role: str) -> str:
        return names.fresh(pattern.node_name(site.name, role, scope="ssvd"))

    wa = numpy_helper.from_array(a, name("a_weight"))
    wb = numpy_helper.from_array(b, name("b_weight"))
    mid = name("a_out")
    node_a = helper.make_node("Conv", [conv.input[0], wa.name], [mid], name=name("a"),
                              kernel_shape=[kh, 1], strides=[sh, 1], dilations=[dh, 1], pads=[top, 0, bottom, 0])
    bias = [conv.input[2]] if len(conv.input) > 2 and conv.input[2] else []
    node_b = helper.make_node("Conv", [mid, wb.name, *bias], [conv.output[0]], name=name("b"),
                              kernel_shape=[1, kw], strides=[1, sw], dilations=[1, dw], pads=[0, left, 0, right])
    return [wa, wb], [node_a, node_b]
