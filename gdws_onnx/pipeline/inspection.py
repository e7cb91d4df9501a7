"""`inspect`: per-conv shapes, MACs, eligibility and how much weight energy low ranks keep."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gdws_onnx.core import decompose
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.graph.model_io import load_model
from gdws_onnx.pipeline.candidates import skip_reason
from gdws_onnx.pipeline.options import SelectionOptions
from gdws_onnx.runtime.session import probe_shapes

TOP_RANKS = (1, 2, 4)


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


def inspect_model(path: str, input_shapes: dict[str, list[int]] | None = None) -> list[ConvInfo]:
    """Describe every Conv of the model at `path` (eligibility as `optimize` defaults judge it);
    an empty list for a model without Conv nodes."""
    loaded = load_model(path)
    sites = find_convs(loaded.model, loaded.base_dir, input_shapes,
                       shape_probe=lambda names: probe_shapes(loaded.model, names, input_shapes))
    selection = SelectionOptions()
    infos = []
    for i, s in enumerate(sites):
        reason = skip_reason(s, i == 0, selection)
        if s.weight is None:
            infos.append(ConvInfo(s.name, [], 0, 0, s.group, [], [], None, None, 0, s.weight_source,
                                  False, reason, 0, {}))
            continue
        spec = decompose.spectrum(s.weight, s.group)
        infos.append(ConvInfo(
            name=s.name, kernel=list(s.kernel_shape), in_channels=s.in_channels, out_channels=s.out_channels,
            groups=s.group, strides=list(s.strides), dilations=list(s.dilations), pixels=s.pixels,
            macs=None if s.pixels is None else s.pixels * s.macs_per_pixel, params=s.params,
            weight_source=s.weight_source, eligible=not reason, reason=reason, max_rank=spec.max_rank,
            energy_kept={f"top{r}": decompose.energy_kept(spec, r) for r in TOP_RANKS}))
    return infos


def to_dicts(infos: list[ConvInfo]) -> list[dict]:
    return [asdict(i) for i in infos]
