"""`inspect`: per-conv shapes, MACs, eligibility, how much weight energy low ranks keep, and how
far each factorization family can cut a conv's MACs at a given weight error (GDWS, spatial SVD,
Tucker-2: the families `optimize --conv auto` times)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gdws_onnx.core import allocate, decompose
from gdws_onnx.errors import OptionError
from gdws_onnx.graph.convs import ConvSite, find_convs
from gdws_onnx.graph.model_io import load_model
from gdws_onnx.peers import (
    PeerSite,
    SpatialSVDPass,
    dense_conv_macs,
    geometry,
    rank_at_error,
    spatial_singular_values,
    ssvd_macs_per_rank,
)
from gdws_onnx.graph.tucker import tucker_skip_reason
from gdws_onnx.pipeline.candidates import skip_reason
from gdws_onnx.pipeline.families import Tucker2Family, dense_macs
from gdws_onnx.pipeline.options import SelectionOptions
from gdws_onnx.runtime.session import probe_shapes

TOP_RANKS = (1, 2, 4)
CUT_ERROR = 0.05  # the weight error at which `inspect` reports each method's MAC cut by default


@dataclass
class ConvInfo:
    """One Conv as `inspect` sees it."""

    name: str
    kernel: list[int]
    in_channels: int
    out_channels: int
    groups: int
    strides: list[int]
    dilations: list[int]
    pixels: int | None
    macs: int | None
    params: int
    weight_source: str
    eligible: bool
    reason: str
    max_rank: int
    energy_kept: dict[str, float]  # "top1" -> fraction of ||W||_F^2 kept by the top-1 per channel
    # each method's conv MACs before / after at relative weight error `error` (||W - W'||^2 / ||W||^2),
    # 1.0 where it would not be cheaper (it leaves the conv dense), None where it does not apply:
    # {"error": 0.05, "gdws": 1.17, "spatial_svd": 5.15, "tucker": 5.45}
    cut_at_error: dict[str, float | None]


def gdws_cut(spec: decompose.Spectrum, error: float) -> float:
    """Conv MACs before / after GDWS at the fewest rank-1 terms whose relative weight error is
    <= error (LEGO), >= 1: a layer GDWS would not make cheaper stays dense."""
    ranks, _ = allocate.relative_lego(decompose.scores(spec), error)
    return max(1.0, decompose.original_cost_per_pixel(spec) / decompose.gdws_cost_per_pixel(spec, ranks))


def spatial_svd_cut(site: ConvSite, error: float) -> float | None:
    """Conv MACs before / after spatial SVD at the lowest rank whose relative weight error is
    <= error, >= 1; None where spatial SVD does not apply (`SpatialSVDPass.check`)."""
    if SpatialSVDPass(rank_fraction=1.0, skip_first=False).check(PeerSite(site, first=False)) is not None:
        return None
    geo, shape = geometry(site), site.weight.shape
    rank = rank_at_error(spatial_singular_values(site.weight), error)
    return max(1.0, dense_conv_macs(shape, geo) / (rank * ssvd_macs_per_rank(shape, geo)))


def tucker_cut(site: ConvSite, error: float) -> float | None:
    """Conv MACs before / after Tucker-2 at the cheapest rank pair whose relative weight error is
    <= error, >= 1 (the form `optimize --conv auto` builds there); None where Tucker-2 does not
    apply (`graph.tucker.tucker_skip_reason`) or the output size is unknown."""
    if tucker_skip_reason(site) is not None or site.pixels is None:
        return None
    forms = Tucker2Family().forms(site, [error])  # only forms with fewer MACs than the conv
    return dense_macs(site) / forms[0].macs if forms else 1.0


def inspect_model(path: str, input_shapes: dict[str, list[int]] | None = None,
                  error: float = CUT_ERROR) -> list[ConvInfo]:
    """Describe every Conv of the model at `path` (eligibility as `optimize` defaults judge it;
    each method's MAC cut at relative weight error `error`); an empty list for a model without
    Conv nodes."""
    if not 0 <= error < 1:
        raise OptionError(f"{{0}} must be in [0, 1), got {error}", "error")
    loaded = load_model(path)
    sites = find_convs(loaded.model, loaded.base_dir, input_shapes,
                       shape_probe=lambda names: probe_shapes(loaded.model, names, input_shapes))
    selection = SelectionOptions()
    infos = []
    for i, s in enumerate(sites):
        reason = skip_reason(s, i == 0, selection)
        if s.weight is None:
            infos.append(ConvInfo(s.name, [], 0, 0, s.group, [], [], None, None, 0, s.weight_source,
                                  False, reason, 0, {}, {"error": error, "gdws": None, "spatial_svd": None,
                                                                     "tucker": None}))
            continue
        spec = decompose.spectrum(s.weight, s.group)
        infos.append(ConvInfo(
            name=s.name, kernel=list(s.kernel_shape), in_channels=s.in_channels, out_channels=s.out_channels,
            groups=s.group, strides=list(s.strides), dilations=list(s.dilations), pixels=s.pixels,
            macs=None if s.pixels is None else s.pixels * s.macs_per_pixel, params=s.params,
            weight_source=s.weight_source, eligible=not reason, reason=reason, max_rank=spec.max_rank,
            energy_kept={f"top{r}": decompose.energy_kept(spec, r) for r in TOP_RANKS},
            cut_at_error={"error": error, "gdws": gdws_cut(spec, error), "spatial_svd": spatial_svd_cut(s, error),
                          "tucker": tucker_cut(s, error)}))
    return infos


def to_dicts(infos: list[ConvInfo]) -> list[dict]:
    return [asdict(i) for i in infos]


def model_cut(infos: list[ConvInfo], method: str) -> float | None:
    """Whole-model conv MACs before / after if every conv took `method`'s cut at the error of
    `cut_at_error` (convs it does not apply to stay dense); None when a conv's MACs are unknown."""
    if not infos or any(i.macs is None for i in infos):
        return None
    after = sum(i.macs / (i.cut_at_error.get(method) or 1.0) for i in infos)
    return sum(i.macs for i in infos) / after if after else None
