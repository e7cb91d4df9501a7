"""What a sweep measured: one `PointResult` per point, the `SweepResult` of a run, and reading
a sweep.json back."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field



@dataclass
class PointResult:
    """Everything measured for one point (accuracies are fractions; None = not measured)."""

    key: str
    label: str
    method: str
    params: dict
    status: str  # "ok" or "failed"
    error: str = ""
    model_file: str = ""
    file_bytes: int = 0
    parameters: int = 0
    conv_macs: int = 0
    conv_mac_reduction: float | None = None
    fc_macs: int | None = None  # Gemm/MatMul MACs per sample (None: a shape unknown, or a point from before)
    fc_mac_reduction: float | None = None  # the original's fc_macs / this point's
    fc_rewrite: dict | None = None  # FC points: pipeline.report.FCSummary.to_dict() of the rewrite
    clean: float | None = None
    clean_interval: list[float] | None = None
    robust: float | None = None
    robust_interval: list[float] | None = None
    robust_by_attack: dict[str, float] = field(default_factory=dict)
    gradient_source: str | None = None
    reference: str = "original"  # key of the original's evaluation this point is compared with
    agreement: float | None = None  # clean top-1 agreement with the original
    robust_mcnemar_p: float | None = None  # reference vs this point, robust correctness
    samples: int | None = None  # how many of the first samples it was evaluated on
    # "b1": [median, p10, p90, ci_low, ci_high] ratio (the 95 % CI of the median; older points: 3 values)
    latency: dict[str, list[float]] = field(default_factory=dict)
    original_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the point's last build-and-measure (or re-timing) run
    # wall time of each phase of that run, seconds: "build" (the rewrite / peer construction),
    # "reference" (evaluating the original it is compared with, when that happened in this point),
    # "clean", "gradient_check", "attack <name>" for every attack run, "timing" (latency)
    phases: dict[str, float] = field(default_factory=dict)
    fingerprint: str = ""
    timing: dict = field(default_factory=dict)  # SweepOptions.timing() of the latency numbers


@dataclass
class SweepResult:
    """All points of one sweep with the settings and environment they were measured in."""

    model: str
    model_sha256: str
    options: dict
    environment: dict
    points: list[PointResult]
    command: str = ""
    extra_attacks: list[str] = field(default_factory=list)  # attacks run beyond options["attacks"], and why
    seconds: float = 0.0  # wall time of the run that wrote this result (points done before not counted)

    def to_dict(self) -> dict:
        return asdict(self)


def load_sweep(path: str) -> SweepResult:
    """A sweep.json (or the folder holding it) back as a SweepResult."""
    if os.path.isdir(path):
        path = os.path.join(path, "sweep.json")
    with open(path) as f:
        d = json.load(f)
    d["points"] = [PointResult(**p) for p in d["points"]]
    return SweepResult(**d)
