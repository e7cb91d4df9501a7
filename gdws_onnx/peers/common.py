"""What every peer construction shares: its report, the sites it judges, and MAC accounting."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gdws_onnx.errors import OptionError
from gdws_onnx.graph.convs import ConvSite


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
    params_before: int | None = None  # weight and bias elements (None: weight unknown)
    params_after: int | None = None


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


@dataclass(frozen=True)
class PeerSite:
    """A conv as a peer pass's `check` judges it: the conv, and whether it is the model's first."""

    conv: ConvSite
    first: bool


def peer_sites(sites: list[ConvSite]) -> list[PeerSite]:
    """The model's convs, in graph order, as peer sites."""
    return [PeerSite(s, i == 0) for i, s in enumerate(sites)]


def site_macs(site: ConvSite) -> int | None:
    """MACs per sample of a conv (None when its weight or output size is unknown)."""
    return site.pixels * site.macs_per_pixel if site.weight is not None and site.pixels is not None else None


def total_macs(report: PeerReport) -> PeerReport:
    """Sum the layers' MACs into the report; a target the totals miss (beyond 0.1 %) is not met,
    and the message says by how much. Returns the report."""
    report.macs_before = sum(x.macs_before or 0 for x in report.layers)
    report.macs_after = sum(x.macs_after or 0 for x in report.layers)
    if report.met and report.mac_reduction is not None and report.mac_reduction < report.target * (1 - 1e-3):
        report.met = False
    if report.met is False:
        report.message = mac_shortfall(report.mac_reduction, report.target)
    return report


def mac_shortfall(reached: float | None, target: float) -> str:
    """Why a conv MAC budget was missed: the reduction reached (None or 0: no conv rewritten)."""
    if not reached:
        return "no conv could be rewritten"
    return f"reached conv MACs / {reached:.3f}, short of / {target:g}: the eligible layers cannot give more"


def require_output_sizes(sites: list[ConvSite]) -> None:
    """A MAC budget needs every conv's output size: OptionError naming the unknown ones."""
    unknown = [s.name for s in sites if s.weight is not None and s.pixels is None]
    if unknown:
        raise OptionError(f"{{0}} needs every conv's output size; unknown for {unknown[:3]}: give {{1}}",
                          "mac_reduction", "input_shapes")
