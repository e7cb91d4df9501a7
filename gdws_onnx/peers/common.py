"""What every peer construction shares: its report and how it takes a model in."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx

from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.model_io import load_model


@dataclass
class PeerLayer:
    """One conv of a peer construction: what was done to it and its MACs per sample."""

    name: str
    status: str  # "rewritten" or "skipped"
    reason: str = ""
    rank: int | None = None  # spatial SVD: rank r; pruning: kept output channels
    max_rank: int | None = None  # spatial SVD: min(I kh, O kw); pruning: output channels
    macs_before: int | None = None
    macs_after: int | None = None
    relative_error: float | None = None  # ||W - W'||_F^2 / ||W||_F^2 (GDWS's unweighted meaning)


@dataclass
class PeerReport:
    """Per-layer results and whole-model conv MACs per sample (all convs with known shapes)."""

    method: str
    layers: list[PeerLayer] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    target: float | None = None  # the requested conv MAC reduction, if any
    met: bool | None = None
    message: str = ""

    @property
    def mac_reduction(self) -> float | None:
        """Whole-model conv MACs before / after."""
        return self.macs_before / self.macs_after if self.macs_after else None

    @property
    def rewritten(self) -> list[PeerLayer]:
        return [layer for layer in self.layers if layer.status == "rewritten"]

    def to_dict(self) -> dict:
        return {**asdict(self), "mac_reduction": self.mac_reduction}




def copy_model(model_or_path: onnx.ModelProto | str) -> tuple[onnx.ModelProto, str]:
    if isinstance(model_or_path, str):
        loaded = load_model(model_or_path)
        return loaded.model, loaded.base_dir
    copy = onnx.ModelProto()
    copy.CopyFrom(model_or_path)
    return copy, ""


def site_macs(site: ConvSite) -> int | None:
    return site.pixels * site.macs_per_pixel if site.weight is not None and site.pixels is not None else None


def require_output_sizes(sites: list[ConvSite]) -> None:
    """A MAC budget needs every conv's output size: GDWSError naming the unknown ones."""
    unknown = [s.name for s in sites if s.weight is not None and s.pixels is None]
    if unknown:
        raise GDWSError(f"mac_reduction needs every conv's output size; unknown for {unknown[:3]}: "
                        "give input_shapes")
