"""Report dataclasses for `optimize` and their renderings (a rich table, JSON)."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field

from .runtime import OutputComparison


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
    measured_ratio: dict[int, float] | None = None  # batch -> GDWS / original layer latency

    @property
    def macs_before(self) -> int | None:
        return None if self.pixels is None else self.pixels * self.macs_per_pixel_before

    @property
    def macs_after(self) -> int | None:
        return None if self.pixels is None else self.pixels * self.macs_per_pixel_after


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

    def _total(self, attr: str) -> int | None:
        vals = [getattr(layer, attr) for layer in self.layers]
        return None if any(v is None for v in vals) else int(sum(vals))

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

    def to_dict(self) -> dict:
        layers = []
        for layer in self.layers:
            d = asdict(layer)
            d["macs_before"], d["macs_after"] = layer.macs_before, layer.macs_after
            layers.append(d)
        return {
            "summary": {
                "convs": len(self.layers), "rewritten": len(self.rewritten),
                "conv_macs_before": self.conv_macs_before, "conv_macs_after": self.conv_macs_after,
                "mac_reduction": self.mac_reduction, "predicted_mismatch": self.predicted_mismatch,
                "params_before": sum(layer.params_before for layer in self.layers),
                "params_after": sum(layer.params_after for layer in self.layers),
            },
            "budget": asdict(self.budget),
            "verification": {**asdict(self.verification),
                             "outputs": [o.to_dict() for o in self.verification.outputs]},
            "layers": layers, "latency": self.latency, "options": self.options, "timings": self.timings,
            "versions": self.versions, "bias_correction": self.bias_correction,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def versions() -> dict[str, str | None]:
    """Versions of everything a result depends on (None for an optional package not installed)."""
    from importlib import metadata

    from . import __version__

    out: dict[str, str | None] = {"onnx-gdws": __version__, "python": platform.python_version(),
                                  "machine": platform.machine(),
                                  "processor": platform.processor() or platform.machine()}
    for dist in ("onnx", "onnxruntime", "numpy", "scipy", "onnx-ad", "torch", "torchattacks"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def json_default(o):
    """json.dumps `default` for numpy scalars and arrays."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def human(n: float | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _worst(ratios: dict) -> dict:
    """The measurement (a bench.Ratio dict) of the batch with the highest median."""
    return max(ratios.values(), key=lambda r: r["median"])


def _fold_producers(lat: dict | None) -> dict[str, str]:
    """Producer conv -> the layer whose Gather was folded into it (so it emits that layer's
    gathered channels: its row's MACs and parameters change)."""
    from .rewrite import layer_of

    if not lat:
        return {}
    return {layer_of(t["producer"]): t["layer"] for t in lat.get("fold_trials", []) if t["layer"] in lat["folded"]}


def _status(layer: LayerReport, lat: dict | None, folded_in: str | None) -> str:
    """The status cell: rewritten (realization, measured layer ratio) or skipped (reason), and
    which layer's Gather was folded into this conv (changing its output channels), if any."""
    from .bench import format_ratio

    if layer.status == "rewritten":
        text = "rewritten" + (f" ({layer.realization})" if layer.realization else "")
        measured = (lat or {}).get("layers", {}).get(layer.name)
        if measured and measured["chosen"] is not None:
            text += f", layer ratio {format_ratio(_worst(measured['options'][measured['chosen']]['ratios']))}"
    else:
        text = f"skipped: {layer.reason}"
    if folded_in:
        text += f"; output channels changed: {folded_in}'s Gather folded into it"
    return text


def optimize_table(report: OptimizeReport):
    """A rich Table: one row per Conv, a totals row. Under --target latency its caption says
    what the ratios are: GDWS / original latency (below 1 is faster), median [interval]."""
    from rich.table import Table

    lat = report.latency
    caption = None
    if lat:
        caption = ("layer ratio = GDWS / original latency of the layer alone (< 1 is faster), median "
                   f"[{lat.get('confidence', 0.95):.0%} confidence interval of the median] over interleaved "
                   f"rounds; a layer is kept only if the whole interval is below {lat.get('layer_threshold', 1):g}")
    t = Table(title="GDWS rewrite", show_lines=False, caption=caption, caption_justify="left")
    for col, justify in (("conv", "left"), ("kernel", "left"), ("C->M (g)", "left"), ("G/max", "right"),
                         ("MACs before", "right"), ("MACs after", "right"), ("params before", "right"),
                         ("params after", "right"), ("rel. err", "right"), ("status", "left")):
        t.add_column(col, justify=justify, overflow="fold")
    folded_into = _fold_producers(lat)
    for layer in report.layers:
        rewritten = layer.status == "rewritten"
        grp = f" ({layer.groups})" if layer.groups > 1 else ""
        t.add_row(
            layer.name, "x".join(map(str, layer.kernel)), f"{layer.in_channels}->{layer.out_channels}{grp}",
            f"{layer.total_rank}/{layer.in_channels * layer.max_rank}" if rewritten else "-",
            human(layer.macs_before), human(layer.macs_after),
            human(layer.params_before), human(layer.params_after),
            f"{layer.relative_error:.4f}" if rewritten else "-",
            _status(layer, lat, folded_into.get(layer.name)),
        )
    ratio = report.mac_reduction
    t.add_row("total", "", "", "", human(report.conv_macs_before), human(report.conv_macs_after),
              human(sum(x.params_before for x in report.layers)),
              human(sum(x.params_after for x in report.layers)), "",
              f"{len(report.rewritten)}/{len(report.layers)} rewritten"
              + (f", conv MACs / {ratio:.2f}" if ratio else ""), style="bold")
    return t


def latency_lines(lat: dict | None) -> list[str]:
    """Plain lines on the measured whole-model latency (--target latency). Every ratio is new /
    old latency, median [confidence interval of the median], with its number of rounds."""
    from .bench import format_ratio

    if not lat:
        return []
    env = lat["environment"]

    def ratios(rs: dict) -> str:
        return ", ".join(f"batch {b}: {format_ratio(r, 3)}" + (f" ({r['rounds']} rounds)" if r.get("rounds") else "")
                         for b, r in rs.items())

    lines = [f"latency on {lat['ep']} ({env['cpu']}, threads {env['threads'] or 'default'}, "
             f"onnxruntime {env['ort']}; layer cache hits {lat['cache']['hits']}, misses {lat['cache']['misses']}):"]
    if lat["checks"] or lat.get("fold_trials"):
        lines.append(f"  ratios: new / old latency, median [{lat.get('confidence', 0.95):.0%} confidence interval "
                     "of the median]; faster = the whole interval below 1")
    for step in lat["checks"]:
        tail = f" -> not measurably faster, reverting {step['reverted']}" if step["reverted"] else " -> faster"
        lines.append(f"  {_plural(len(step['rewritten']), 'layer')} rewritten: optimized/original "
                     f"{ratios(step['ratios'])}{tail}")
    for t in lat.get("fold_trials", []):
        verdict = ("folded" if t["layer"] in lat["folded"] else
                   "folded, then undone: the folded model was not measurably faster than the original"
                   if t["folded"] else "kept the Gather")
        lines.append(f"  fold {t['layer']}'s Gather into {t['producer']}: folded/not {ratios(t['ratios'])} -> {verdict}")
    if lat["folded"] and lat["final_ratios"]:
        lines.append(f"  with {_plural(len(lat['folded']), 'Gather')} folded: optimized/original "
                     f"{ratios(lat['final_ratios'])} -> faster")
    if lat["message"]:
        lines.append(f"  {lat['message']}")
    return lines


def mismatch_lines(report: OptimizeReport) -> list[str]:
    """The predicted top-1 mismatch bound, and the measured disagreement when verified on --data."""
    p = report.predicted_mismatch
    if p is None:
        return []
    budget = f" (budget {report.budget.target:g})" if report.budget.mode == "mismatch" else ""
    line = f"predicted top-1 mismatch (sum alpha * e, first-order bound with noise-gain alphas): {p:.4g}{budget}"
    v = report.verification
    measured = [o for o in v.outputs if o.top1_agreement is not None] if v.ran else []
    if measured and report.options.get("data"):
        line += (f"; measured top-1 disagreement on {v.inputs}: "
                 + ", ".join(f"{1 - o.top1_agreement:.4g}" + (f" ({o.name})" if len(measured) > 1 else "")
                             for o in measured))
    return [line]


def bias_correction_lines(report: OptimizeReport) -> list[str]:
    """One line on what --bias-correction did."""
    bc = report.bias_correction
    if not bc:
        return []
    done = [layer for layer in bc["layers"] if layer["status"] == "corrected"]
    skipped = [f"{layer['name']} ({layer['reason']})" for layer in bc["layers"] if layer["status"] != "corrected"]
    line = (f"bias correction: {len(done)} layer(s) shifted by their mean output error on {bc['inputs']}"
            + (f"; largest shift {max(layer['max_abs_shift'] for layer in done):.3g}" if done else ""))
    return [line] + ([f"  not corrected: {', '.join(skipped)}"] if skipped else [])


def verification_lines(v: VerificationReport) -> list[str]:
    """Plain lines describing the verification, for the CLI."""
    if not v.ran:
        return [f"verification skipped: {v.message}"]
    lines = [f"verified in ONNX Runtime on {v.inputs}:"]
    for o in v.outputs:
        top1 = f", top-1 agreement {o.top1_agreement:.1%}" if o.top1_agreement is not None else ""
        lines.append(f"  {o.name}: max abs {o.max_abs:.3g}, mean abs {o.mean_abs:.3g}, "
                     f"relative {o.relative:.3g}{top1}")
    if v.vacuous:
        lines.append("  warning: the verification is vacuous: no output changes with the input (the original gives "
                     "the same values on a second, different input), so agreement does not show that the rewrite "
                     "is right on real inputs")
    elif v.constant_outputs:
        lines.append(f"  warning: {len(v.constant_outputs)} of {len(v.outputs)} outputs do not change with the input "
                     f"({', '.join(v.constant_outputs)}): agreement on them does not show that the rewrite is right "
                     "on real inputs")
    if v.max_error is not None:
        lines.append(f"  gate --max-error {v.max_error:g} (relative): {'PASS' if v.passed else 'FAIL'}")
    if v.message:
        lines.append(f"  {v.message}")
    return lines
