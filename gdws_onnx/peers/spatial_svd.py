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
from gdws_onnx.core.geometry import out_spatial, resolved_pads
from gdws_onnx.errors import OptionError, OptionText
from gdws_onnx.graph import pattern
from gdws_onnx.graph.convs import ConvSite, find_convs
from gdws_onnx.graph.passes import PassResult
from gdws_onnx.graph.rewrite import Names, replace_convs
from gdws_onnx.peers.common import (
    PeerLayer,
    PeerReport,
    PeerSite,
    peer_sites,
    require_output_sizes,
    site_macs,
    total_macs,
)

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


def spatial_singular_values(weight: np.ndarray) -> np.ndarray:
    """The singular values of `spatial_matrix(weight)` in float64, largest first (no vectors)."""
    if weight.ndim != 4:
        raise ValueError(f"spatial SVD needs a 2-D conv weight (O, I, kh, kw), got shape {weight.shape}")
    return np.linalg.svd(spatial_matrix(weight.astype(np.float64)), compute_uv=False)


def rank_at_error(singular_values: np.ndarray, eps: float) -> int:
    """The smallest rank r >= 1 with sum_{j >= r} sigma_j^2 <= eps ||W||_F^2 (Eckart-Young)."""
    energy = np.asarray(singular_values, np.float64) ** 2
    total = float(energy.sum())
    tail = total - np.cumsum(energy)  # tail[r - 1]: the error at rank r
    return int(np.argmax(tail <= eps * total + 1e-12 * total)) + 1 if total > 0 else 1


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


@dataclass(frozen=True)
class SpatialGeometry:
    """Sizes of one 2-D conv once its pads are explicit: input (H, W), output (H', W')."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int
    pads: tuple[int, int, int, int]  # top, left, bottom, right


def geometry(site: ConvSite) -> SpatialGeometry:
    """Explicit pads and sizes of a 2-D conv with known input size (`core.geometry`)."""
    pads = resolved_pads(site.in_spatial, site.kernel_shape, site.strides, site.pads, site.dilations, site.auto_pad)
    out_h, out_w = out_spatial(site.in_spatial, site.kernel_shape, site.strides, pads, site.dilations)
    return SpatialGeometry(*site.in_spatial, out_h, out_w, tuple(pads))


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


def _ranks_by_error(cands: list[_SsvdCandidate], error: float) -> None:
    """rank = the lowest with relative weight error <= error, per layer (`rank_at_error`)."""
    for c in cands:
        c.rank = rank_at_error(c.spec.s, error)


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


class SpatialSVDPass:
    """Rewrite eligible convs (2-D, group 1, not 1x1, known input size: `check`) as spatial-SVD pairs.

    Give one budget: `mac_reduction` R (whole-model conv MACs before / after, all convs counted,
    as GDWS's mac_reduction; ranks by one global greedy, `report.met` says whether R was
    reached), `error_budget` E in [0, 1) (per layer the lowest rank whose relative weight error
    ||W - W_r||^2 / ||W||^2 is <= E, as GDWS's error_budget) or `rank_fraction` f in (0, 1]
    (rank ceil(f r_max) per layer). A layer whose pair is not cheaper than its conv is left as
    is, unless `force`. `call(model)` edits the model in
    place (IR version, opsets, metadata and I/O names are kept); its report is a PeerReport.
    """

    def __init__(self, mac_reduction: float | None = None, rank_fraction: float | None = None,
                 skip_first: bool = True, force: bool = False,
                 input_shapes: dict[str, list[int]] | None = None, error_budget: float | None = None):
        if sum(b is not None for b in (mac_reduction, error_budget, rank_fraction)) != 1:
            raise OptionError("give one of {0}, {1} or {2}", "mac_reduction", "error_budget", "rank_fraction")
        if mac_reduction is not None and not mac_reduction >= 1:
            raise OptionError(f"{{0}} must be >= 1, got {mac_reduction}", "mac_reduction")
        if error_budget is not None and not 0 <= error_budget < 1:
            raise OptionError(f"{{0}} must be in [0, 1), got {error_budget}", "error_budget")
        if rank_fraction is not None and not 0 < rank_fraction <= 1:
            raise OptionError(f"{{0}} must be in (0, 1], got {rank_fraction}", "rank_fraction")
        self.mac_reduction = mac_reduction
        self.error_budget = error_budget
        self.rank_fraction = rank_fraction
        self.skip_first = skip_first
        self.force = force
        self.input_shapes = input_shapes

    def check(self, site: PeerSite) -> str | None:
        """Why a conv is not a spatial-SVD candidate (None: it is)."""
        conv = site.conv
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
        if site.first and self.skip_first:
            return OptionText("first conv ({0} to include)", "skip_first=False")
        if conv.in_spatial is None:
            return "input spatial shape unknown (give input_shapes)"
        return None

    def call(self, model: onnx.ModelProto) -> PassResult:
        mac_reduction = self.mac_reduction
        sites = find_convs(model, input_shapes=self.input_shapes)
        reasons = {p.conv.name: self.check(p) or "" for p in peer_sites(sites)}
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
        elif self.error_budget is not None:
            _ranks_by_error(cands, self.error_budget)
        else:
            _ranks_by_fraction(cands, self.rank_fraction)
        for c in cands:
            if c.rank is not None and not self.force and c.rank * c.per_rank >= c.original:
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
        return PassResult(model, bool(chosen), total_macs(report))


def _ssvd_layer(site: ConvSite, reason: str, cand: _SsvdCandidate | None) -> PeerLayer:
    macs = site_macs(site)
    layer = PeerLayer(name=site.name, status="skipped", reason=reason, macs_before=macs, macs_after=macs)
    if site.weight is not None:
        layer.params_before = layer.params_after = site.params
    if cand is not None:
        layer.max_rank = cand.spec.max_rank
    if cand is not None and not reason:
        o, i, kh, kw = cand.spec.weight_shape
        layer.status, layer.rank = "rewritten", cand.rank
        layer.macs_after = cand.rank * cand.per_rank
        layer.params_after = cand.rank * (i * kh + o * kw) + site.params - site.weight.size  # A, B, the bias
        layer.relative_error = relative_error(cand.spec, cand.rank)
    return layer
