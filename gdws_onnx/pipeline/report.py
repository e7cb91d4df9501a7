"""Report dataclasses for `optimize` and their JSON (the console table is cli/render.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from gdws_onnx.errors import OptionError
from gdws_onnx.runtime.bench import format_ratio, ratio_of
from gdws_onnx.runtime.session import OutputComparison


@dataclass
class LayerReport:
    """One Conv: what it was, what happened to it, and why."""

    name: str
    kernel: list[int]
    in_channels: int
    out_channels: int
    groups: int
    status: str  # "rewritten" or "skipped"
    reason: str = ""
    weight_source: str = ""
    max_rank: int = 0  # min(M / groups, K)
    total_rank: int = 0  # G = sum_c g_c
    realization: str = ""  # "gather+dw+pw" or "dw+pw" (no Gather needed)
    macs_per_pixel_before: int = 0
    macs_per_pixel_after: int = 0
    pixels: int | None = None  # output pixels per sample, when the shape is known
    params_before: int = 0
    params_after: int = 0
    relative_error: float = 0.0  # sum alpha ||W - Q||^2 / sum alpha ||W||^2
    measured_ratio: dict[int, float] | None = None  # batch -> rewritten / original layer latency
    family: str = ""  # the factorization of a rewritten conv: "gdws" or "ssvd" (pipeline.families)

    @property
    def macs_before(self) -> int | None:
        return None if self.pixels is None else self.pixels * self.macs_per_pixel_before

    @property
    def macs_after(self) -> int | None:
        return None if self.pixels is None else self.pixels * self.macs_per_pixel_after

    @property
    def speedup_per_mac_cut(self) -> float | None:
        """(original / GDWS layer latency) / (original / GDWS MACs) at the worst measured batch:
        1 = the layer gets all of its MAC cut as speed; None when not measured."""
        if not self.measured_ratio or not self.macs_per_pixel_after:
            return None
        return (1 / max(self.measured_ratio.values())) / (self.macs_per_pixel_before / self.macs_per_pixel_after)


@dataclass
class BudgetReport:
    """The budget asked for and what was achieved."""

    mode: str  # "error", "macs", "latency", "mismatch" or "uniform"
    target: float
    # what the budget measured, in the target's unit: largest rewritten layer's relative error
    # (error), conv MAC ratio before / after (macs), measured whole-model speed-up original /
    # optimized (latency), predicted mismatch (mismatch); None when not known or for "uniform".
    # The conv MAC ratio is always in OptimizeReport.mac_reduction.
    achieved: float | None
    met: bool = True
    message: str = ""


@dataclass
class VerificationReport:
    """Original vs optimized outputs in ONNX Runtime."""

    ran: bool
    inputs: str = ""  # "random (seed 0, shapes ...)" or "data file ..."
    outputs: list[OutputComparison] = field(default_factory=list)
    max_error: float | None = None  # the gate on relative error, if any
    passed: bool = True
    message: str = ""
    # outputs whose values stayed the same when the original ran on a second, different input:
    # they do not depend on the input, so agreeing on them does not show the rewrite right on real inputs
    constant_outputs: list[str] = field(default_factory=list)
    vacuous: bool = False  # every compared output is such (e.g. onnx's light-zoo models)
    # the OptionError that skipped it (`message` is its text), for a caller to name the option in
    # its own terms (the CLI: as a flag); not part of to_dict
    error: OptionError | None = None


@dataclass
class LatencyReport:
    """What the latency planner measured and decided (target="latency"); `OptimizeReport.latency`
    holds it as a dict (`to_dict`)."""

    ep: str
    batches: list[int]
    threads: int | None
    environment: dict  # what cached layer latencies depend on besides the layer (measure.environment_key)
    cache: dict  # path, hits, misses
    model_baseline_ms: float | None  # latency budget: the original's whole-model time
    budget_search: list[dict]  # latency budget: the bisection over required layer savings
    faster: bool  # the never-slower check found a measurably faster model
    final_ratios: dict  # batch -> bench.Ratio dict of the returned model vs the original
    speedup: float | None  # original / optimized latency, worst batch's median
    layer_threshold: float  # a layer is kept only if measurably below this ratio (measure.FASTER)
    confidence: float  # of every interval a decision rests on
    layers: dict[str, dict]  # layer -> measured options and the index of the chosen one
    checks: list  # latency.FallbackStep of the never-slower check
    fold_trials: list  # latency.FoldTrial
    folded: list[str]
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FCSummary:
    """The FC (Gemm/MatMul) rewrite's part of the report, kept apart from the conv savings."""

    scheme: str
    layers: list = field(default_factory=list)  # graph.fc.FCLayerReport rows
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why not)
    latency: dict | None = None  # target="latency": pipeline.fc_latency.FCLatencyReport.to_dict()

    @property
    def params_before(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params for layer in self.layers)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "rewritten": len(self.layers),
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_per_row_before": sum(layer.dense_macs for layer in self.layers),
                "macs_per_row_after": sum(layer.macs for layer in self.layers),
                "layers": [asdict(layer) for layer in self.layers],
                "skipped": [{"layer": name, "reason": why} for name, why in self.skipped],
                "latency": self.latency}


@dataclass
class ConvKernelTimes:
    """One conv's kernel time in ORT's profile, float and INT8 (microseconds)."""

    name: str
    float_us: float
    int8_us: float

    @property
    def loss_us(self) -> float:
        """What the INT8 kernel costs over the float one (positive: INT8 is slower)."""
        return self.int8_us - self.float_us


@dataclass
class MixedStep:
    """One whole-model measurement: the model with `float_convs` float against the best so far."""

    float_convs: list[str]
    ratios: dict[int, dict]  # batch -> Ratio as a dict (candidate / best so far)
    kept: bool
    after: str = ""  # the kept conv this one follows (a grown step), "" for a screened candidate


@dataclass
class MixedPrecisionReport:
    """What the INT8 step's mixed-precision search (pipeline.mixed_precision) measured and chose."""

    screened: list[ConvKernelTimes] = field(default_factory=list)  # every conv found in both profiles
    float_convs: list[str] = field(default_factory=list)  # the convs the result leaves float
    steps: list[MixedStep] = field(default_factory=list)
    screen_batch: int = 1
    message: str = ""  # why nothing was searched, when nothing was

    @property
    def candidates(self) -> list[ConvKernelTimes]:
        """The screened convs whose INT8 kernel was slower, the largest loss first."""
        return sorted((t for t in self.screened if t.loss_us > 0), key=lambda t: -t.loss_us)

    def to_dict(self) -> dict:
        return {"float_convs": self.float_convs, "screen_batch": self.screen_batch, "message": self.message,
                "candidates": [asdict(t) for t in self.candidates],
                "screened": [asdict(t) for t in self.screened], "steps": [asdict(s) for s in self.steps]}

    def summary(self) -> str:
        """One line: each conv left float with its profiled kernel times and the ratio of the model
        with it float to the model before it; or why none is."""
        if self.message:
            return self.message
        if not self.float_convs:
            tried = f"; {self.steps[0].float_convs[-1]} float was not measurably faster" if self.steps else ""
            return f"every conv INT8 ({len(self.candidates)} with a slower INT8 kernel in the profile{tried})"
        times = {t.name: t for t in self.screened}
        parts = []
        for step in (s for s in self.steps if s.kept):
            name = step.float_convs[-1]
            t = times.get(name)
            kernel = f"INT8 kernel {t.int8_us:.0f} us, float {t.float_us:.0f} us" if t is not None else "not profiled"
            after = f"after {step.after}; " if step.after else ""
            ratio = ", ".join(f"b{b} {format_ratio(ratio_of(r), 3)}" for b, r in step.ratios.items())
            parts.append(f"{name} ({after}{kernel}) {ratio}")
        return (f"{len(self.float_convs)} conv(s) left float, each measured against the model before it: "
                + "; ".join(parts))


@dataclass
class QuantizeSummary:
    """The INT8 step's part of the report (quantize="int8"): how the rewritten model was quantized
    and calibrated, which convs the graph has QDQ-wrapped (graph.qdq) and which ones ORT's CPU EP
    runs as int8 kernels (runtime.kernels)."""

    scheme: str  # "int8"
    method: str  # the quantizer's description: format, weights, activations, calibration method
    calibration: str  # where the calibration samples came from
    samples: int  # how many were used
    placement: str  # what was chosen for the QDQ placement, and why
    convs: list[dict] = field(default_factory=list)  # per Conv: name, layer, role, wrapped, missing, kernel
    op_counts: dict[str, int] = field(default_factory=dict)  # op type -> nodes in ORT's optimized graph
    mixed_precision: MixedPrecisionReport | None = None  # the convs left float, and why (None: not searched)

    @property
    def convs_quantized(self) -> int:
        """Convs with DequantizeLinear on data and weight and a QuantizeLinear on the output."""
        return sum(c["wrapped"] for c in self.convs)

    @property
    def int8_kernels(self) -> dict:
        """How many convs ORT runs as int8 kernels (QLinearConv, ConvInteger): all, and those of the
        rewritten (GDWS) layers; the ones that stay float, with the op they run as."""
        gdws = [c for c in self.convs if c["role"] is not None]
        return {"convs": len(self.convs), "int8": sum(c["int8"] for c in self.convs),
                "gdws_convs": len(gdws), "gdws_int8": sum(c["int8"] for c in gdws),
                "not_int8": [{"name": c["name"], "kernel": c["kernel"] or "not found"}
                             for c in self.convs if not c["int8"]]}

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "method": self.method, "calibration": self.calibration,
                "samples": self.samples, "placement": self.placement, "convs_quantized": self.convs_quantized,
                "int8_kernels": self.int8_kernels, "convs": self.convs, "op_counts": self.op_counts,
                "mixed_precision": None if self.mixed_precision is None else self.mixed_precision.to_dict()}


@dataclass
class OptimizeReport:
    """Everything `optimize` did, for the summary table and `--report FILE.json`."""

    layers: list[LayerReport]
    budget: BudgetReport
    verification: VerificationReport
    options: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    latency: dict | None = None  # --target latency: environment, cache, whole-model checks
    # sum over rewritten convs of sum_c alpha_c e_c: with noise-gain alphas (`onnx-gdws sensitivity`)
    # the first-order bound on P(top-1 differs); None unless every rewritten conv has alphas
    predicted_mismatch: float | None = None
    # --bias-correction: bias_correction.BiasCorrectionReport.to_dict() (per layer shifts)
    bias_correction: dict | None = None
    # fc != "off": the Gemm/MatMul rewrite (graph.fc.FCReport): rewritten layers and skip reasons
    fc: FCSummary | None = None
    # quantize != "off": the INT8 step (QDQ placement, calibration, the kernels ORT runs)
    quantize: QuantizeSummary | None = None
    # conv == "ssvd": peers.PeerReport.to_dict() of the spatial SVD (its layers; `layers` stays empty)
    spatial_svd: dict | None = None
    # finetune: recover.finetune.FinetuneReport.to_dict() of the recovery step (held-out scores, steps)
    finetune: dict | None = None

    def _total(self, attr: str) -> int | None:
        if self.spatial_svd is not None:
            return int(self.spatial_svd[attr])
        vals = [getattr(layer, attr) for layer in self.layers]
        return None if any(v is None for v in vals) else int(sum(vals))

    def _params(self, attr: str) -> int | None:
        """Conv weight and bias elements summed over the convs (spatial SVD: None when one is unknown)."""
        if self.spatial_svd is not None:
            vals = [layer.get(attr) for layer in self.spatial_svd["layers"]]
            return None if any(v is None for v in vals) else int(sum(vals))
        return int(sum(getattr(layer, attr) for layer in self.layers))

    @property
    def conv_macs_before(self) -> int | None:
        return self._total("macs_before")

    @property
    def conv_macs_after(self) -> int | None:
        return self._total("macs_after")

    @property
    def mac_reduction(self) -> float | None:
        b, a = self.conv_macs_before, self.conv_macs_after
        return b / a if b and a else None

    @property
    def rewritten(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status == "rewritten"]

    @property
    def families(self) -> dict[str, list[str]]:
        """Which factorization family won which convs: family -> rewritten conv names, in graph order."""
        out: dict[str, list[str]] = {}
        for layer in self.rewritten:
            out.setdefault(layer.family or "gdws", []).append(layer.name)
        return out

    def to_dict(self) -> dict:
        layers = []
        for layer in self.layers:
            d = asdict(layer)
            d["macs_before"], d["macs_after"] = layer.macs_before, layer.macs_after
            d["speedup_per_mac_cut"] = layer.speedup_per_mac_cut
            layers.append(d)
        return {
            "summary": {
                "convs": len(self.layers), "rewritten": len(self.rewritten),
                "families": {k: len(v) for k, v in self.families.items()},
                "conv_macs_before": self.conv_macs_before, "conv_macs_after": self.conv_macs_after,
                "mac_reduction": self.mac_reduction, "predicted_mismatch": self.predicted_mismatch,
                "params_before": self._params("params_before"), "params_after": self._params("params_after"),
            },
            "budget": asdict(self.budget),
            "verification": {**{k: v for k, v in asdict(self.verification).items() if k != "error"},
                             "outputs": [o.to_dict() for o in self.verification.outputs]},
            "layers": layers, "latency": self.latency, "options": self.options, "timings": self.timings,
            "versions": self.versions, "bias_correction": self.bias_correction,
            "fc": None if self.fc is None else self.fc.to_dict(),
            "quantize": None if self.quantize is None else self.quantize.to_dict(),
            "spatial_svd": self.spatial_svd, "finetune": self.finetune,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
