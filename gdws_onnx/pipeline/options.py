"""The options of `optimize`, in groups; each step and budget planner receives only its group.

`OptimizeOptions(error_budget=0.1, skip_first=False, ...)` takes the flat keyword options of
`gdws_onnx.optimize` (each goes to the group with a field of that name) or whole groups
(`OptimizeOptions(budget=BudgetOptions(mac_reduction=2))`). Errors name the parameters
(`OptionError`), never CLI flags.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from gdws_onnx.errors import OptionError, literal
from gdws_onnx.pipeline.report import BudgetReport
from gdws_onnx.recover.adversary import parse_attack

DEFAULT_ERROR_BUDGET = 0.1  # per-layer relative weighted error when no budget is given
# conv="auto": the per-layer relative weight error when no budget is given, and the pay-off a form
# must show for it (a layer at error e must run at most 1 - PAYOFF e of its dense time). Set from
# PGD-20 on 1000 test images of every robust zoo model, each attacked white-box (docs/auto.md):
# without the pay-off rule, 0.15 held the paper-width VGG-16 (-0.3 / -0.4 at 5.8x) but cost the
# narrow VGG 4.6 points and the narrow ResNet-18 2.4 for 1.1x and 1.01x. Their forms only ran at
# 0.65-0.95 of their layers' time at errors 0.1-0.15, which the pay-off rule refuses, while the
# VGG-16's ran at 0.1-0.44 and keep their speed.
DEFAULT_AUTO_ERROR_BUDGET = 0.15
DEFAULT_PAYOFF = 4.0
FC_SCHEMES = ("off", "kronecker", "lowrank")  # Gemm/MatMul rewrites (graph.fc)
QUANTIZE_SCHEMES = ("off", "int8")  # after the rewrites: ORT static QDQ quantization (peers.quantize)
# the Conv rewrite: auto (per layer, the fastest family by measured latency: pipeline.auto), GDWS,
# spatial SVD (k x 1 then 1 x k convs), none
CONV_REWRITES = ("auto", "gdws", "ssvd", "off")
# what conv="auto" cannot go with yet (GDWS-only options, or budgets it does not plan)
AUTO_EXCLUDES = ("mismatch_budget", "uniform_rank", "latency_reduction", "alphas", "width_multiple", "data_aware",
                 "bias_correction")
BUDGETS = ("error_budget", "mac_reduction", "latency_reduction", "mismatch_budget", "uniform_rank")


@dataclass
class BudgetOptions:
    """How ranks are chosen: at most one budget (none: the error budget DEFAULT_ERROR_BUDGET),
    what decides (MACs or measured latency) and the per-channel error weights."""

    error_budget: float | None = None  # per-layer relative weighted error, 0 <= eps < 1
    mac_reduction: float | None = None  # whole-model conv MACs / R
    mismatch_budget: float | None = None  # predicted top-1 mismatch sum alpha * e <= P (needs alphas)
    uniform_rank: int | None = None  # every channel of every candidate keeps min(g, max rank) terms (g=1: DWS)
    latency_reduction: float | None = None  # whole-model latency / R (target="latency")
    # "latency": decide by latency measured on the target EP (TimingOptions; never a slower model);
    # "macs": by MAC counts (planning on a host that is not the target). None: `default_target`
    target: str | None = None
    alphas: str | dict | None = None  # per-layer, per-channel weights (file or dict)
    width_multiple: int = 1  # round each layer's GDWS width G (conv="ssvd": each rank) to a multiple (8, 16: ORT CPU's fast widths)
    force: bool = False  # rewrite even when GDWS is not cheaper
    payoff: float | None = None  # conv="auto": a form at error e must run <= 1 - payoff e of its layer (None: DEFAULT_PAYOFF)

    def default_target(self) -> str:
        """"macs" when a budget only the MAC planner fills is given (mac_reduction, uniform_rank),
        else "latency"."""
        return "macs" if self.mac_reduction is not None or self.uniform_rank is not None else "latency"

    @property
    def planner(self) -> str:
        """The planner that fills this budget in: 'latency' (target latency, under an error or a
        latency budget), else 'mismatch', 'uniform', 'macs' or 'error'."""
        if self.target == "latency":
            return "latency"
        for name, value in (("mismatch", self.mismatch_budget), ("uniform", self.uniform_rank),
                            ("macs", self.mac_reduction)):
            if value is not None:
                return name
        return "error"

    @property
    def error(self) -> float:
        """The per-layer error budget: error_budget, or DEFAULT_ERROR_BUDGET when not given."""
        return DEFAULT_ERROR_BUDGET if self.error_budget is None else self.error_budget

    def requested(self) -> BudgetReport:
        """The budget asked for (mode and target), before anything is allocated."""
        for mode, target in (("macs", self.mac_reduction), ("mismatch", self.mismatch_budget),
                             ("uniform", self.uniform_rank), ("latency", self.latency_reduction)):
            if target is not None:
                return BudgetReport(mode=mode, target=target, achieved=None)
        return BudgetReport(mode="error", target=self.error, achieved=None)

    def validate(self) -> None:
        """Raise OptionError for a value out of range or budgets that do not go together."""
        if sum(getattr(self, b) is not None for b in BUDGETS) > 1:
            raise OptionError("give one of {0}, {1}, {2}, {3}, {4}, not several", *BUDGETS)
        if self.uniform_rank is not None:
            _check(self.uniform_rank >= 1, f"{{0}} must be >= 1, got {self.uniform_rank}", "uniform_rank")
            _check(self.target == "macs", "{0} fixes the ranks; it cannot be used with {1} latency",
                   "uniform_rank", "target")
        if self.mismatch_budget is not None:
            _check(0 < self.mismatch_budget < 1, f"{{0}} must be in (0, 1), got {self.mismatch_budget}",
                   "mismatch_budget")
            _check(self.alphas is not None, "{0} needs {1} (noise-gain weights from `onnx-gdws sensitivity`)",
                   "mismatch_budget", "alphas")
            # with target latency the mismatch allocation fixes the ranks and only realizations are timed
        _check(self.width_multiple >= 1, f"{{0}} must be >= 1, got {self.width_multiple}", "width_multiple")
        _check(self.target in ("macs", "latency"),
               f"{{0}} must be 'macs' or 'latency', got {literal(repr(self.target))}", "target")
        if self.latency_reduction is not None:
            _check(self.target == "latency", "{0} needs {1} latency", "latency_reduction", "target")
        if self.mac_reduction is not None:
            _check(self.target != "latency", "{0} decides by MACs; with {1} latency use {2}",
                   "mac_reduction", "target", "latency_reduction")
        if self.latency_reduction is not None:
            _check(self.latency_reduction >= 1, f"{{0}} must be >= 1, got {self.latency_reduction}",
                   "latency_reduction")
        if self.error_budget is not None:
            _check(0 <= self.error_budget < 1, f"{{0}} must be in [0, 1), got {self.error_budget}", "error_budget")
        if self.mac_reduction is not None:
            _check(self.mac_reduction >= 1, f"{{0}} must be >= 1, got {self.mac_reduction}", "mac_reduction")
        if self.payoff is not None:
            _check(self.payoff >= 0, f"{{0}} must be >= 0, got {self.payoff}", "payoff")

    @property
    def auto_error(self) -> float:
        """The per-layer error cap conv="auto" plans under: error_budget, or DEFAULT_AUTO_ERROR_BUDGET."""
        return DEFAULT_AUTO_ERROR_BUDGET if self.error_budget is None else self.error_budget

    @property
    def auto_payoff(self) -> float:
        """The pay-off conv="auto" asks of a form: payoff, or DEFAULT_PAYOFF when not given."""
        return DEFAULT_PAYOFF if self.payoff is None else self.payoff


@dataclass
class SelectionOptions:
    """Which convs are candidates for a rewrite."""

    skip_first: bool = True  # leave the first conv as it is
    include: str | None = None  # regex on conv names
    exclude: str | None = None
    fc: str = "off"  # Gemm/MatMul layers: "kronecker", "lowrank" (graph.fc) or "off"
    conv: str | None = None  # Conv layers: one of CONV_REWRITES ("off": leave every conv alone); None: `default_conv`

    def validate(self) -> None:
        _check(self.conv in CONV_REWRITES, f"{{0}} must be one of {', '.join(CONV_REWRITES)}, got "
               f"{literal(repr(self.conv))}", "conv")
        _check(self.fc in FC_SCHEMES, f"{{0}} must be one of {', '.join(FC_SCHEMES)}, got {literal(repr(self.fc))}",
               "fc")
        for param in ("include", "exclude"):
            pattern = getattr(self, param)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise OptionError(f"{{0}} is not a valid regular expression: {literal(e)}", param) from None


@dataclass
class CalibrationOptions:
    """What is learned from calibration inputs (RunOptions.data)."""

    bias_correction: bool = False  # shift rewritten convs' biases by their mean output error on the data
    data_aware: float | None = None  # lam: truncate in the metric (1 - lam) I + lam S_c / s from the data
    quantize: str = "off"  # "int8": static QDQ INT8 of the rewritten model, calibrated on the data
    # with quantize="int8": leave float the convs whose INT8 kernel is slower, where the whole model
    # then measures faster on the CPU EP (pipeline.mixed_precision); False: every conv INT8
    mixed_precision: bool = True
    # recovery (pipeline.recovery): fine-tune the rewritten model for this many epochs of the data,
    # distilling the original, after the rewrites and before INT8; None: no fine-tune
    finetune: float | None = None
    finetune_attack: str = "pgd-2"  # its training attack: none | fgsm-rs | pgd-K
    finetune_eps: float = 0.1  # its L-inf budget (and that of its held-out PGD score), pixel units

    def validate(self) -> None:
        if self.data_aware is not None:
            _check(0 < self.data_aware <= 1, f"{{0}} must be in (0, 1], got {self.data_aware}", "data_aware")
        _check(self.quantize in QUANTIZE_SCHEMES, f"{{0}} must be one of {', '.join(QUANTIZE_SCHEMES)}, got "
               f"{literal(repr(self.quantize))}", "quantize")
        if self.finetune is not None:
            _check(self.finetune > 0, f"{{0}} must be > 0 epochs, got {self.finetune}", "finetune")
            _check(0 <= self.finetune_eps <= 1, f"{{0}} must be in [0, 1], got {self.finetune_eps}", "finetune_eps")
            try:
                parse_attack(self.finetune_attack, self.finetune_eps)
            except OptionError:
                raise OptionError(f"{{0}} must be none, fgsm-rs or pgd-K, got {literal(repr(self.finetune_attack))}",
                                  "finetune_attack") from None


@dataclass
class VerifyOptions:
    """The comparison of original and optimized outputs in ONNX Runtime, and its gate."""

    verify: bool = True
    max_error: float | None = None  # gate on the relative output error

    def validate(self) -> None:
        if self.max_error is not None:
            _check(self.max_error >= 0, f"{{0}} must be >= 0, got {self.max_error}", "max_error")


@dataclass
class TimingOptions:
    """How latency is measured under target="latency"."""

    ep: str = "cpu"
    batches: list[int] = field(default_factory=lambda: [1])
    runs: int = 20  # timed runs per measurement (the first look; more are added until decided)
    max_rounds: int = 320  # cap on the interleaved rounds of one latency comparison
    measure_seconds: float = 10.0  # cap on the timing of one latency comparison
    cache: str | None = None  # latency-table JSON; None = the user cache, "" = no cache
    probe_factory: Callable[[int, str], object] | None = None  # (batch, "layer"|"model") -> measure.Probe
    latency_table: str | None = None  # layer latencies from `onnx-gdws profile` on the device: nothing timed here

    def validate(self) -> None:
        _check(bool(self.batches) and all(b >= 1 for b in self.batches) and self.runs >= 3,
               "{0} needs positive sizes and {1} at least 3", "batches", "runs")
        _check(self.max_rounds >= 1 and self.measure_seconds > 0, "{0} must be >= 1 and {1} > 0",
               "max_rounds", "measure_seconds")


@dataclass
class RunOptions:
    """How the model is run in ONNX Runtime (shape probing, calibration, verification, timing):
    on what inputs and with how many intra-op threads."""

    data: str | None = None  # .npz with `x` (or arrays named after the inputs), or a data set spec
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0  # of random inputs
    threads: int | None = None
    progress: Callable[[str], None] | None = None  # told, in a line, each long step as it starts


CALLABLES = ("probe_factory", "progress")  # flat options that are functions: never in a report

GROUPS: dict[str, type] = {  # OptimizeOptions attribute -> its group's class
    "budget": BudgetOptions, "selection": SelectionOptions, "calibration": CalibrationOptions,
    "verification": VerifyOptions, "timing": TimingOptions, "run": RunOptions,
}
GROUP_OF: dict[str, str] = {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}
FLAT = ("error_budget", "mac_reduction", "mismatch_budget", "uniform_rank", "alphas", "skip_first", "include",
        "exclude", "force", "verify", "data", "input_shapes", "max_error", "seed", "bias_correction", "data_aware",
        "width_multiple", "target", "ep", "batches", "threads", "latency_reduction", "cache", "runs", "max_rounds",
        "measure_seconds", "latency_table", "fc", "conv", "quantize", "mixed_precision", "payoff", "finetune",
        "finetune_attack", "finetune_eps",
        "probe_factory", "progress")  # the flat options, in the order reports list them (callables not)


@dataclass(init=False)
class OptimizeOptions:
    """All options of `optimize`, in groups (the CLI flags of `onnx-gdws optimize` are the flat
    names in kebab-case, same meaning)."""

    budget: BudgetOptions
    selection: SelectionOptions
    calibration: CalibrationOptions
    verification: VerifyOptions
    timing: TimingOptions
    run: RunOptions

    def __init__(self, *, budget: BudgetOptions | None = None, selection: SelectionOptions | None = None,
                 calibration: CalibrationOptions | None = None, verification: VerifyOptions | None = None,
                 timing: TimingOptions | None = None, run: RunOptions | None = None, **flat):
        """Groups as given (default: their defaults), then each flat keyword set on its group."""
        given = dict(budget=budget, selection=selection, calibration=calibration, verification=verification,
                     timing=timing, run=run)
        for name, cls in GROUPS.items():
            setattr(self, name, given[name] if given[name] is not None else cls())
        for key, value in flat.items():
            if key not in GROUP_OF:
                raise TypeError(f"OptimizeOptions got an unexpected keyword argument {key!r}")
            setattr(getattr(self, GROUP_OF[key]), key, value)
        if self.budget.target is None:
            self.budget.target = self.budget.default_target()
        if self.selection.conv is None:
            self.selection.conv = self.default_conv()

    def auto_conflicts(self) -> list[str]:
        """The options given that conv="auto" cannot go with (AUTO_EXCLUDES)."""
        b, c = self.budget, self.calibration
        given = {"mismatch_budget": b.mismatch_budget is not None, "uniform_rank": b.uniform_rank is not None,
                 "latency_reduction": b.latency_reduction is not None, "alphas": b.alphas is not None,
                 "width_multiple": b.width_multiple != 1, "data_aware": c.data_aware is not None,
                 "bias_correction": c.bias_correction}
        return [k for k in AUTO_EXCLUDES if given[k]]

    def default_conv(self) -> str:
        """The conv rewrite when none is given: "auto" under target="latency" (every family, by
        measured latency), unless an option only the GDWS planner takes is given; else "gdws"."""
        return "auto" if self.budget.target == "latency" and not self.auto_conflicts() else "gdws"

    @classmethod
    def from_kwargs(cls, **flat) -> OptimizeOptions:
        """The options from the flat keywords of `gdws_onnx.optimize`."""
        return cls(**flat)

    def validate(self) -> None:
        """Check conflicts between options first (a conflict is the error to fix, not a missing
        companion of one of its sides), then every group, then what ties groups together; raise OptionError."""
        if self.selection.conv is None:
            self.selection.conv = self.default_conv()
        if self.selection.conv == "ssvd":
            self.check_spatial_svd()
        auto = self.selection.conv == "auto" or (self.selection.conv == "ssvd" and self.budget.target == "latency")
        if auto:
            self.check_auto()
        _check(self.budget.payoff is None or auto, "{0} is the rule of conv=auto (and conv=ssvd) under {1} latency, "
               "which weigh each layer's error against its measured speed", "payoff", "target")
        for name in GROUPS:
            check = getattr(getattr(self, name), "validate", None)
            if check is not None:
                check()
        if self.selection.fc != "off":
            _check(self.timing.latency_table is None, "{0} cannot go with {1}: the table holds conv layers "
                   "only, and FC layers would be timed on this machine, not on the device", "fc", "latency_table")
            _check(self.budget.mismatch_budget is None and self.budget.uniform_rank is None,
                   "{0} layers take an error or MAC budget, not {1} or {2}", "fc", "mismatch_budget", "uniform_rank")
        _check(self.timing.latency_table is None or self.budget.mismatch_budget is None,
               "{0} cannot go with {1}: a profiled table holds the realizations of its own rank ladder",
               "mismatch_budget", "latency_table")
        _check(self.timing.latency_table is None or self.budget.target == "latency",
               "{0} needs {1} latency", "latency_table", "target")
        for param, on in (("bias_correction", self.calibration.bias_correction),
                          ("data_aware", self.calibration.data_aware is not None),
                          ("quantize", self.calibration.quantize != "off")):
            _check(not on or bool(self.run.data), "{0} needs {1} (calibration inputs)", param, "data")
        _check(self.calibration.finetune is None or bool(self.run.data),
               "{0} needs {1} (training data with labels, never a test split)", "finetune", "data")
        _check(self.calibration.quantize == "off" or self.timing.latency_table is None,
               "{0} cannot go with {1}: a profiled table holds float layer timings", "quantize", "latency_table")

    def check_auto(self) -> None:
        """conv="auto" (and conv="ssvd" under target="latency", auto restricted to spatial SVD)
        decides by measured latency under an error budget, and takes none of AUTO_EXCLUDES."""
        conv = f"conv={self.selection.conv}"
        _check(self.budget.target == "latency", "{0} chooses by measured latency: it needs {1} latency",
               conv, "target")
        conflicts = self.auto_conflicts()
        if conflicts:
            raise OptionError("{0} cannot go with {1} (not planned across families yet); use conv=gdws for it",
                              conv, conflicts[0])

    def check_spatial_svd(self) -> None:
        """conv="ssvd" takes a MAC budget (ranks allocated across layers by one greedy) or an error
        budget (per layer, default DEFAULT_ERROR_BUDGET; under target="latency" network-wide, as
        conv="auto" restricted to spatial SVD), width_multiple (its ranks in blocks) except under
        target="latency", and none of the GDWS-only options."""
        b, c, t, sel = self.budget, self.calibration, self.timing, self.selection
        for param, on in (("mismatch_budget", b.mismatch_budget is not None),
                          ("uniform_rank", b.uniform_rank is not None), ("alphas", b.alphas is not None),
                          ("width_multiple", b.width_multiple != 1 and b.target == "latency"),
                          ("data_aware", c.data_aware is not None), ("bias_correction", c.bias_correction),
                          ("latency_table", t.latency_table is not None and b.target != "latency"),
                          ("include", sel.include is not None),
                          ("exclude", sel.exclude is not None)):
            _check(not on, "{0} cannot go with {1} (a GDWS option)", "conv=ssvd", param)

    def to_dict(self) -> dict:
        """The flat options as a report lists them (an alphas dict as '<dict>', no probe factory)."""
        merged = {k: v for name in GROUPS for k, v in asdict(getattr(self, name)).items()}
        d = {k: merged[k] for k in FLAT if k not in CALLABLES}
        if isinstance(self.budget.alphas, dict):
            d["alphas"] = "<dict>"
        return d


def _check(ok: bool, message: str, *params: str) -> None:
    """Raise OptionError(message, *params) unless ok."""
    if not ok:
        raise OptionError(message, *params)
