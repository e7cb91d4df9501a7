"""Spatial SVD (the Qualcomm AIMET scheme): k_h x k_w conv -> (k_h x 1, I -> r) then (1 x k_w, r -> O).

With W of shape (O, I, kh, kw), M[(i,y),(o,x)] = W[o,i,y,x] is an (I kh) x (O kw) matrix; the
rank-r truncated SVD M ~= U_r S_r V_r^T gives A = U_r S_r^1/2 and B = S_r^1/2 V_r^T (Eckart-Young
optimal, exact at r = min(I kh, O kw)). New nodes are named `<conv>/ssvd/a|b`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gdws_onnx.core import allocate
from gdws_onnx.graph.convs import ConvSite, find_convs
from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.rewrite import Names, replace_convs
from gdws_onnx.peers.common import PeerLayer, PeerReport, copy_model, require_output_sizes, site_macs

# ---------------------------------------------------------------------------------------------
# numpy math


@dataclass(frozen=True)
class SpatialSpectrum:
    """SVD of the spatial-SVD matrix M (I kh x O kw) of one weight (O, I, kh, kw), in float64."""

    u: np.ndarray  # (I kh, r_max)
    s: np.ndarray  # (r_max,)
    vt: np.ndarray  # (r_max, O kw)
    weight_shape: tuple[int, int, int, int]

    @property
    def max_rank(self) -> int:
        return int(self.s.size)


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """M of shape (I kh, O kw) with M[(i,y),(o,x)] = W[o,i,y,x]."""
    o, i, kh, kw = weight.shape
    return np.asarray(weight).transpose(1, 2, 0, 3).reshape(i * kh, o * kw)


def spatial_spectrum(weight: np.ndarray) -> SpatialSpectrum:
    """Thin SVD of `spatial_matrix(weight)` in float64; r_max = min(I kh, O kw)."""
    if weight.ndim != 4:
        raise ValueError(f"spatial SVD needs a 2-D conv weight (O, I, kh, kw), got shape {weight.shape}")
    u, s, vt = np.linalg.svd(spatial_matrix(weight.astype(np.float64)), full_matrices=False)
    return SpatialSpectrum(u=u, s=s, vt=vt, weight_shape=tuple(int(d) for d in weight.shape))


def relative_energy(spec: SpatialSpectrum) -> np.ndarray:
    """sigma_j^2 / ||W||_F^2 per rank j (non-increasing, sums to 1)."""
    total = float((spec.s**2).sum())
    return spec.s**2 / total if total > 0 else np.zeros_like(spec.s)


def relative_error(spec: SpatialSpectrum, rank: int) -> float:
    """||W - W_r||_F^2 / ||W||_F^2 = sum_{j >= r} sigma_j^2 / sum_j sigma_j^2."""
    return float(relative_energy(spec)[rank:].sum())


def spatial_factors(spec: SpatialSpectrum, rank: int, dtype: np.dtype = np.float32
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Weights (A, B) of the two convs at rank r: A (r, I, kh, 1) = (U_r S_r^1/2)^T reshaped,
    B (O, r, 1, kw) from S_r^1/2 V_r^T; B conv A == W_r, the best rank-r approximation of W."""
    o, i, kh, kw = spec.weight_shape
    if not 1 <= rank <= spec.max_rank:
        raise ValueError(f"rank must be in [1, {spec.max_rank}], got {rank}")
    root = np.sqrt(spec.s[:rank])
    a = (spec.u[:, :rank] * root).T.reshape(rank, i, kh, 1)
    b = (root[:, None] * spec.vt[:rank]).reshape(rank, o, kw).transpose(1, 0, 2).reshape(o, rank, 1, kw)
    return a.astype(dtype), b.astype(dtype)


def spatial_reconstruct(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The dense weight (O, I, kh, kw) that conv A then conv B realize: W[o,i,y,x] = sum_r A[r,i,y] B[o,r,x]."""
    return np.einsum("riy,orx->oiyx", a[..., 0].astype(np.float64), b[:, :, 0].astype(np.float64))


def explicit_pads(in_spatial: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
                  dilations: tuple[int, ...], auto_pad: str, pads: tuple[int, ...]) -> tuple[int, ...]:
    """ONNX pads [begin..., end...] equivalent to `auto_pad` at this input size: SAME_* pads
    total = max((ceil(n / s) - 1) s + (k - 1) d + 1 - n, 0), the odd one at the end (UPPER) or
    the beginning (LOWER); VALID pads nothing; NOTSET returns `pads` (zeros if empty)."""
    nd = len(kernel)
    if auto_pad == "NOTSET":
        return tuple(pads) if pads else (0,) * (2 * nd)
    if auto_pad == "VALID":
        return (0,) * (2 * nd)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad {auto_pad!r}")
    begin, end = [], []
    for n, k, s, d in zip(in_spatial, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return (*begin, *end)


def conv_out_size(n: int, k: int, s: int, d: int, pad_total: int) -> int:
    """floor((n + pads - ((k - 1) d + 1)) / s) + 1."""
    return (n + pad_total - ((k - 1) * d + 1)) // s + 1


@dataclass(frozen=True)
class SpatialGeometry:
    """Sizes of one 2-D conv once its pads are explicit: input (H, W), output (H', W')."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int
    pads: tuple[int, int, int, int]  # top, left, bottom, right


def geometry(site: ConvSite) -> SpatialGeometry:
    """Explicit pads and sizes of a 2-D conv with known input size."""
    (in_h, in_w), (kh, kw) = site.in_spatial, site.kernel_shape
    pads = explicit_pads(site.in_spatial, site.kernel_shape, site.strides, site.dilations, site.auto_pad,
                         site.pads)
    out_h = conv_out_size(in_h, kh, site.strides[0], site.dilations[0], pads[0] + pads[2])
    out_w = conv_out_size(in_w, kw, site.strides[1], site.dilations[1], pads[1] + pads[3])
    return SpatialGeometry(in_h, in_w, out_h, out_w, tuple(pads))


def ssvd_macs_per_rank(weight_shape: tuple[int, ...], geo: SpatialGeometry) -> int:
    """MACs per sample of one rank: A runs at H' x W (vertical stride only, no horizontal pads),
    B at H' x W': I kh H' W + O kw H' W'."""
    o, i, kh, kw = weight_shape
    return i * kh * geo.out_h * geo.in_w + o * kw * geo.out_h * geo.out_w


def dense_conv_macs(weight_shape: tuple[int, ...], geo: SpatialGeometry) -> int:
    """MACs per sample of the original conv: O I kh kw H' W'."""
    o, i, kh, kw = weight_shape
    return o * i * kh * kw * geo.out_h * geo.out_w


# ---------------------------------------------------------------------------------------------
# the graph pass


def ssvd_skip_reason(site: ConvSite, first: bool, skip_first: bool) -> str:
    """Why a conv is not a spatial-SVD candidate ('' if it is)."""
    if site.weight is None:
        return site.weight_source
    nd = site.weight.ndim - 2
    if nd != 2:
        return f"{nd}-D conv (spatial SVD splits 2-D kernels only)"
    if site.group != 1:
        kind = "depthwise" if site.in_channels == site.group else "grouped"
        return f"{kind} conv (group={site.group}; spatial SVD needs group=1)"
    if site.kernel_size == 1:
        return "1x1 conv (no spatial kernel to split)"
    if first and skip_first:
        return "first conv (skip_first=False to include)"
    if site.in_spatial is None:
        return "input spatial shape unknown (give input_shapes)"
    return ""


@dataclass
class _SsvdCandidate:
    site: ConvSite
    spec: SpatialSpectrum
    geo: SpatialGeometry
    rank: int | None = None
    reason: str = ""

    @property
    def per_rank(self) -> int:
        return ssvd_macs_per_rank(self.spec.weight_shape, self.geo)

    @property
    def original(self) -> int:
        return dense_conv_macs(self.spec.weight_shape, self.geo)


def _ranks_by_fraction(cands: list[_SsvdCandidate], fraction: float) -> None:
    """rank = ceil(fraction r_max) per layer."""
    for c in cands:
        c.rank = min(max(math.ceil(fraction * c.spec.max_rank - 1e-9), 1), c.spec.max_rank)


def _ranks_by_macs(cands: list[_SsvdCandidate], budget: float) -> bool:
    """Global greedy over all layers' ranks by (sigma_j^2 / ||W||^2) / MACs per rank, total <= budget;
    a layer not cheaper than its original conv stays original (allocate.allocate_macs on one
    'channel' per layer). Returns whether the budget was feasible."""
    layers = [allocate.LayerCost(scores=relative_energy(c.spec)[None, :], term_cost=float(c.per_rank),
                                 original_cost=float(c.original)) for c in cands]
    result = allocate.allocate_macs(layers, budget)
    for c, r in zip(cands, result.ranks):
        c.rank = None if r is None else int(r.sum())
        if r is None:
            c.reason = "not chosen by the MAC budget (spatial SVD would not be cheaper)"
    return result.feasible


def _ssvd_subgraph(site: ConvSite, a: np.ndarray, b: np.ndarray, geo: SpatialGeometry, names: Names
                   ) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """x -> Conv A (kh x 1, vertical stride/dilation/pads) -> Conv B (1 x kw, horizontal ones, bias)."""
    conv, base = site.node, f"{site.name}/ssvd"
    (sh, sw), (dh, dw), (kh, kw) = site.strides, site.dilations, site.kernel_shape
    top, left, bottom, right = geo.pads
    wa = numpy_helper.from_array(a, names.fresh(f"{base}/a_weight"))
    wb = numpy_helper.from_array(b, names.fresh(f"{base}/b_weight"))
    mid = names.fresh(f"{base}/a_out")
    node_a = helper.make_node("Conv", [conv.input[0], wa.name], [mid], name=names.fresh(f"{base}/a"),
                              kernel_shape=[kh, 1], strides=[sh, 1], dilations=[dh, 1], pads=[top, 0, bottom, 0])
    bias = [conv.input[2]] if len(conv.input) > 2 and conv.input[2] else []
    node_b = helper.make_node("Conv", [mid, wb.name, *bias], [conv.output[0]], name=names.fresh(f"{base}/b"),
                              kernel_shape=[1, kw], strides=[1, sw], dilations=[1, dw], pads=[0, left, 0, right])
    return [wa, wb], [node_a, node_b]


def spatial_svd(model: onnx.ModelProto | str, mac_reduction: float | None = None,
                rank_fraction: float | None = None, skip_first: bool = True, force: bool = False,
                input_shapes: dict[str, list[int]] | None = None) -> tuple[onnx.ModelProto, PeerReport]:
    """Rewrite eligible convs (2-D, group 1, not 1x1, known input size) as spatial-SVD pairs.

    Give one budget: `mac_reduction` R (whole-model conv MACs before / after, all convs counted,
    as GDWS's --mac-reduction; ranks by one global greedy, `report.met` says whether R was
    reached) or `rank_fraction` f in (0, 1] (rank ceil(f r_max) per layer). A layer whose pair
    is not cheaper than its conv is left as is, unless `force`. The model passed in is not
    modified; IR version, opsets, metadata and I/O names are kept.
    """
    if (mac_reduction is None) == (rank_fraction is None):
        raise GDWSError("give one of mac_reduction or rank_fraction")
    if mac_reduction is not None and not mac_reduction >= 1:
        raise GDWSError(f"mac_reduction must be >= 1, got {mac_reduction}")
    if rank_fraction is not None and not 0 < rank_fraction <= 1:
        raise GDWSError(f"rank_fraction must be in (0, 1], got {rank_fraction}")
    model, base_dir = copy_model(model)
    sites = find_convs(model, base_dir, input_shapes)
    reasons = {s.name: ssvd_skip_reason(s, i == 0, skip_first) for i, s in enumerate(sites)}
    cands = []
    for s in (s for s in sites if not reasons[s.name]):
        geo = geometry(s)
        if s.out_spatial is not None and (geo.out_h, geo.out_w) != tuple(s.out_spatial):
            reasons[s.name] = f"inferred output size {s.out_spatial} disagrees with its attributes"
            continue
        cands.append(_SsvdCandidate(s, spatial_spectrum(s.weight), geo))
    report = PeerReport(method="spatial_svd", target=mac_reduction)
    if mac_reduction is not None:
        require_output_sizes(sites)
        cand_names = {c.site.name for c in cands}
        fixed = sum(site_macs(s) for s in sites if s.weight is not None and s.name not in cand_names)
        total = fixed + sum(c.original for c in cands)
        report.met = _ranks_by_macs(cands, total / mac_reduction - fixed)
    else:
        _ranks_by_fraction(cands, rank_fraction)
    for c in cands:
        if c.rank is not None and not force and c.rank * c.per_rank >= c.original:
            c.reason = f"spatial SVD would not reduce MACs at rank {c.rank} of {c.spec.max_rank}"
        reasons[c.site.name] = reasons[c.site.name] or c.reason
    chosen = {c.site.index: c for c in cands if not c.reason}

    def build(site: ConvSite, names: Names):
        c = chosen[site.index]
        return _ssvd_subgraph(site, *spatial_factors(c.spec, c.rank, site.weight.dtype), c.geo, names)

    replace_convs(model, [c.site for c in chosen.values()], build)
    by_name = {c.site.name: c for c in cands}
    for s in sites:
        report.layers.append(_ssvd_layer(s, reasons[s.name], by_name.get(s.name)))
    report.macs_before = sum(x.macs_before or 0 for x in report.layers)
    report.macs_after = sum(x.macs_after or 0 for x in report.layers)
    if report.met and report.mac_reduction is not None and report.mac_reduction < mac_reduction * (1 - 1e-3):
        report.met = False
    if report.met is False:
        report.message = (f"reached conv MACs / {report.mac_reduction:.3f}, short of / {mac_reduction:g}: "
                          "the eligible layers cannot give more")
    return model, report


def _ssvd_layer(site: ConvSite, reason: str, cand: _SsvdCandidate | None) -> PeerLayer:
    macs = site_macs(site)
    layer = PeerLayer(name=site.name, status="skipped", reason=reason, macs_before=macs, macs_after=macs)
    if cand is not None:
        layer.max_rank = cand.spec.max_rank
    if cand is not None and not reason:
        layer.status, layer.rank = "rewritten", cand.rank
        layer.macs_after = cand.rank * cand.per_rank
        layer.relative_error = relative_error(cand.spec, cand.rank)
    return layer
