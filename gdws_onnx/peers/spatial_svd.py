"""Spatial SVD as a peer construction (the Qualcomm AIMET scheme, at a MAC budget, an error budget
or a rank fraction): `SpatialSVDPass`. The math is `core/spatial_svd.py`, the realization
`graph/spatial_svd.py`; `conv="auto"` uses the same two as one of its factorization families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from gdws_onnx.core import allocate
from gdws_onnx.core.spatial_svd import (
    SpatialGeometry,
    SpatialSpectrum,
    block_energy,
    dense_conv_macs,
    rank_at_error,
    relative_energy,
    relative_error,
    round_rank,
    spatial_factors,
    spatial_spectrum,
    ssvd_macs_per_rank,
)
from gdws_onnx.errors import OptionError, OptionText
from gdws_onnx.graph.convs import ConvSite, find_convs
from gdws_onnx.graph.passes import PassResult
from gdws_onnx.graph.rewrite import Names, replace_convs
from gdws_onnx.graph.spatial_svd import geometry, ssvd_skip_reason, ssvd_subgraph
from gdws_onnx.peers.common import (
    PeerLayer,
    PeerReport,
    PeerSite,
    peer_sites,
    require_output_sizes,
    site_macs,
    total_macs,
)


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


def _ranks_by_fraction(cands: list[_SsvdCandidate], fraction: float, multiple: int = 1) -> None:
    """rank = ceil(fraction r_max) per layer, rounded up to `multiple` (`round_rank`)."""
    for c in cands:
        c.rank = round_rank(max(math.ceil(fraction * c.spec.max_rank - 1e-9), 1), multiple, c.spec.max_rank)


def _ranks_by_error(cands: list[_SsvdCandidate], error: float, multiple: int = 1) -> None:
    """rank = the lowest with relative weight error <= error, per layer (`rank_at_error`),
    rounded up to `multiple` (less error still)."""
    for c in cands:
        c.rank = round_rank(rank_at_error(c.spec.s, error), multiple, c.spec.max_rank)


def _ranks_by_macs(cands: list[_SsvdCandidate], budget: float, multiple: int = 1) -> bool:
    """Global greedy over all layers' ranks by (sigma_j^2 / ||W||^2) / MACs per rank, total <= budget;
    a layer not cheaper than its original conv stays original (allocate.allocate_macs on one
    'channel' per layer). With `multiple` m > 1 the greedy takes whole blocks of m ranks (scores
    `block_energy`, cost m ranks), so every rank is a multiple of m or the layer's full rank.
    Returns whether the budget was feasible."""
    layers = [allocate.LayerCost(scores=block_energy(relative_energy(c.spec), multiple)[None, :],
                                 term_cost=float(c.per_rank * multiple),
                                 original_cost=float(c.original)) for c in cands]
    result = allocate.allocate_macs(layers, budget)
    for c, r in zip(cands, result.ranks):
        c.rank = None if r is None else min(int(r.sum()) * multiple, c.spec.max_rank)
        if r is None:
            c.reason = "not chosen by the MAC budget (spatial SVD would not be cheaper)"
    return result.feasible


class SpatialSVDPass:
    """Rewrite eligible convs (2-D, group 1, not 1x1, known input size: `check`) as spatial-SVD pairs.

    Give one budget: `mac_reduction` R (whole-model conv MACs before / after, all convs counted,
    as GDWS's mac_reduction; ranks by one global greedy, `report.met` says whether R was
    reached), `error_budget` E in [0, 1) (per layer the lowest rank whose relative weight error
    ||W - W_r||^2 / ||W||^2 is <= E, as GDWS's error_budget) or `rank_fraction` f in (0, 1]
    (rank ceil(f r_max) per layer). `rank_multiple` m makes every rank a multiple of m (or the
    full rank): whole blocks of m under the MAC budget, rounded up otherwise; 16 keeps ONNX
    Runtime's CPU convs in their blocked layout on AVX-512 (8 on AVX2). A layer whose pair is not
    cheaper than its conv is left as is, unless `force`. `call(model)` edits the model in
    place (IR version, opsets, metadata and I/O names are kept); its report is a PeerReport.
    """

    def __init__(self, mac_reduction: float | None = None, rank_fraction: float | None = None,
                 skip_first: bool = True, force: bool = False,
                 input_shapes: dict[str, list[int]] | None = None, error_budget: float | None = None,
                 rank_multiple: int = 1):
        if sum(b is not None for b in (mac_reduction, error_budget, rank_fraction)) != 1:
            raise OptionError("give one of {0}, {1} or {2}", "mac_reduction", "error_budget", "rank_fraction")
        if mac_reduction is not None and not mac_reduction >= 1:
            raise OptionError(f"{{0}} must be >= 1, got {mac_reduction}", "mac_reduction")
        if error_budget is not None and not 0 <= error_budget < 1:
            raise OptionError(f"{{0}} must be in [0, 1), got {error_budget}", "error_budget")
        if rank_fraction is not None and not 0 < rank_fraction <= 1:
            raise OptionError(f"{{0}} must be in (0, 1], got {rank_fraction}", "rank_fraction")
        if rank_multiple < 1:
            raise OptionError(f"{{0}} must be >= 1, got {rank_multiple}", "rank_multiple")
        self.mac_reduction = mac_reduction
        self.rank_multiple = rank_multiple
        self.error_budget = error_budget
        self.rank_fraction = rank_fraction
        self.skip_first = skip_first
        self.force = force
        self.input_shapes = input_shapes

    def check(self, site: PeerSite) -> str | None:
        """Why a conv is not a spatial-SVD candidate (None: it is)."""
        conv = site.conv
        reason = ssvd_skip_reason(conv, need_size=False)
        if reason:
            return reason
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
            report.met = _ranks_by_macs(cands, total / mac_reduction - fixed, self.rank_multiple)
        elif self.error_budget is not None:
            _ranks_by_error(cands, self.error_budget, self.rank_multiple)
        else:
            _ranks_by_fraction(cands, self.rank_fraction, self.rank_multiple)
        for c in cands:
            if c.rank is not None and not self.force and c.rank * c.per_rank >= c.original:
                c.reason = f"spatial SVD would not reduce MACs at rank {c.rank} of {c.spec.max_rank}"
            reasons[c.site.name] = reasons[c.site.name] or c.reason
        chosen = {c.site.index: c for c in cands if not c.reason}

        def build(site: ConvSite, names: Names):
            c = chosen[site.index]
            return ssvd_subgraph(site, *spatial_factors(c.spec, c.rank, site.weight.dtype), c.geo, names)

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
