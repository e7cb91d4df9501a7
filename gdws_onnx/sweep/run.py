"""The trade-off sweep: GDWS at a ladder of budgets and its peers, each measured the same way.

Every point is one model built from the original (GDWS at a budget, plain DWS, uniform-rank
GDWS, spatial SVD at the MACs of a GDWS point, ONNX Runtime static INT8, GDWS then INT8 (both
quantized as `optimize(quantize="int8")` does: pipeline.int8's activation type), and the FC
rewrites `fc-kronecker` / `fc-lowrank` at each budget of their own ladder, convs untouched)
and is measured on the same samples as the original: clean accuracy, white-box robust accuracy
(`validation.evaluate_model`: each model attacked with its own gradients, ONNX Runtime judging),
agreement with the original, conv MACs and, apart from them, Gemm/MatMul (FC) MACs, parameters,
file size, and the latency ratio to the original timed interleaved on the chosen EP, and the
wall time of each phase (rewrite, each attack, timing). Each point is written to
`points/<key>.json` as soon as it is measured; a rerun skips every point whose JSON matches the
current settings, and compares new points with the original's per-sample evaluation kept in
`baselines/` (attacking the original again only when the settings changed). Attacks run beyond the ones asked for
(Square beside the BPDA gradients of quantized points) are announced before any work
(`extra_attacks`) and kept in the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from gdws_onnx import peers
from gdws_onnx.runtime.bench import BenchConfig, compare_models, conv_macs, environment
from gdws_onnx.data import DataError, load_dataset
from gdws_onnx.errors import GateFailed, GDWSError, OptionError, OptionText, literal
from gdws_onnx.files import write_json_atomic
from gdws_onnx.graph.convs import infer_shapes
from gdws_onnx.graph.model_io import file_sha256, load_model, save_model
from gdws_onnx.pipeline.int8 import QUANTIZE_ACTIVATIONS
from gdws_onnx.pipeline.optimize import optimize
from gdws_onnx.provenance import json_default, versions
from gdws_onnx.core.stats import mcnemar_exact, proportion
from gdws_onnx.eval.validation import (
    WHITE_BOX,
    ModelResult,
    ProgressFactory,
    ValidateOptions,
    check_attack_requirements,
    evaluate_model,
)

BUDGET_KINDS = {"error": "error_budget", "mac": "mac_reduction", "latency": "latency_reduction"}
FC_PEERS = {"fc-kronecker": "kronecker", "fc-lowrank": "lowrank"}  # peer -> optimize(fc=...), convs off
PEERS = ("dws", "uniform", "ssvd", "prune", "int8", "gdws+int8", *FC_PEERS)
QUANTIZED = ("int8", "gdws+int8")  # attacked with BPDA gradients plus Square, like their reference
DEFAULT_BUDGETS = ("error:0.02", "error:0.05", "error:0.1", "error:0.2", "mac:1.5", "mac:2", "mac:3", "mac:4")
# the FC peers' own ladder: error:E = each FC weight's relative squared Frobenius error,
# mac:R = each FC layer's MACs / R (no latency budget: the FC rewrite does not measure layers)
FC_BUDGET_KINDS = ("error", "mac")
DEFAULT_FC_BUDGETS = ("error:0.02", "error:0.05", "error:0.1", "error:0.2", "mac:2", "mac:4")
DEFAULT_PEERS = ("dws", "uniform:2", "uniform:4", "ssvd", "prune", "int8", "gdws+int8")
# optimize() options a named point may not set: the sweep sets them (timing) or they do not apply
POINT_FIXED = {"ep", "batches", "threads", "verify", "max_error", "input_shapes", "probe_factory", "conv"}
MAC_PEERS = ("ssvd", "prune")  # placed at a conv-MAC reduction: a GDWS point's, or their own (ssvd:R)
PRUNE_MULTIPLE = 8  # pruned widths stay multiples of 8: odd widths lose ORT's fast CPU conv kernels


@dataclass
class SweepOptions:
    """What to build and how to measure it (CLI flags of `onnx-gdws sweep`, same meaning)."""

    data: str = "fashion-mnist:test"
    n: int = 500
    attacks: tuple[str, ...] = ("pgd",)
    eps: float = 0.1
    steps: int = 20
    seed: int = 0
    budgets: tuple[str, ...] = DEFAULT_BUDGETS
    # named GDWS points beyond the budget ladder: (label, optimize() keyword options), e.g.
    # ("fwd mismatch 0.005", {"alphas": "alphas.npz", "mismatch_budget": 0.005, "width_multiple": 16})
    points: tuple[tuple[str, dict], ...] = ()
    peers: tuple[str, ...] = DEFAULT_PEERS
    match_at: tuple[str, ...] = ()  # labels of the GDWS points ssvd/prune/gdws+int8 are placed at (empty: all)
    fc_budgets: tuple[str, ...] = DEFAULT_FC_BUDGETS  # the ladder of the fc-kronecker / fc-lowrank peers
    calibration: str | None = None  # INT8 calibration data spec (default: the training split)
    calibration_n: int = 256
    n_quantized: int | None = None  # quantized points (and their reference) on the first N samples only
    ep: str = "cpu"
    batches: tuple[int, ...] = (1, 32)
    runs: int = 50
    threads: int | None = None
    skip_first: bool = True
    retime: bool = False  # re-measure the latency of finished points, keep their accuracy
    retry_failed: bool = False  # rebuild points that failed before (default: keep the recorded failure)

    def check(self) -> None:
        for b in self.budgets:
            parse_budget(b)
        for b in self.fc_budgets:
            parse_fc_budget(b)
        for p in self.peers:
            parse_peer(p)
        labels = [label for label, _ in self.points]
        if len(set(labels)) != len(labels) or not all(labels):
            raise OptionError("{0} need distinct, non-empty labels", "points")
        for label, params in self.points:
            unknown = sorted(set(params) & POINT_FIXED)
            if unknown:
                raise OptionError(f"{{0}} {literal(repr(label))}: {literal(', '.join(unknown))} set by the sweep",
                                  "points")
        if self.n_quantized is not None and not 1 <= self.n_quantized <= self.n:
            raise OptionError("{0} must be between 1 and {1}", "n_quantized", "n")
        known = {f"gdws {b}" for b in self.budgets} | {f"gdws {label}" for label, _ in self.points}
        missing = [m for m in self.match_at if m not in known]
        if missing:
            raise OptionError(f"{{0}} {literal(', '.join(map(repr, missing)))}: not a GDWS point of this sweep "
                              f"({literal(', '.join(sorted(known)))})", "match_at")
        if self.n < 1 or self.runs < 3 or not self.batches or min(self.batches) < 1:
            raise OptionError("{0} must be >= 1, {1} >= 3 and {2} positive", "n", "runs", "batches")

    def calibration_spec(self) -> str:
        """The INT8 calibration set: `calibration`, else fashion-mnist:train for Fashion-MNIST,
        else the evaluation data itself (flagged in the report as in-sample)."""
        if self.calibration:
            return self.calibration
        return "fashion-mnist:train" if self.data.lower().startswith("fashion-mnist") else self.data

    LATENCY_FIELDS = ("ep", "batches", "runs", "threads")

    def measurement(self) -> dict:
        """The settings a point's model and accuracy depend on (its fingerprint; latency apart)."""
        d = asdict(self)
        for k in ("budgets", "points", "match_at", "peers", "fc_budgets", "retime", "retry_failed",
                  *self.LATENCY_FIELDS):
            d.pop(k)
        d.pop("n_quantized")  # only quantized points depend on it (`fingerprint`)
        return d

    def timing(self) -> dict:
        """The settings a point's latency ratios depend on; other values -> re-timed, not rebuilt."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if k in self.LATENCY_FIELDS}


@dataclass
class PointSpec:
    """One model to build: a method and its parameters."""

    method: str  # original | gdws | dws | uniform | ssvd | prune | int8 | gdws+int8 | fc-kronecker | fc-lowrank
    params: dict = field(default_factory=dict)
    label: str = ""

    @property
    def quantized(self) -> bool:
        return self.method in QUANTIZED or bool(self.params.get("square"))

    @property
    def key(self) -> str:
        """A file-name-safe, unique name."""
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.label or self.method)


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


def parse_budget(spec: str) -> dict:
    """'error:0.05' | 'mac:2' | 'latency:1.2' -> optimize() keyword options."""
    kind, _, value = spec.partition(":")
    try:
        v = float(value)
    except ValueError:
        v = None
    if kind not in BUDGET_KINDS or v is None:
        raise OptionError(f"{{0}} {literal(repr(spec))}: expected error:EPS, mac:R or latency:R", "budgets")
    opts = {BUDGET_KINDS[kind]: v}
    if kind == "latency":
        opts["target"] = "latency"
    return opts


def parse_fc_budget(spec: str) -> dict:
    """An FC peer's budget, 'error:0.05' | 'mac:2' -> optimize() keyword options (per FC layer)."""
    kind = spec.partition(":")[0]
    if kind not in FC_BUDGET_KINDS:
        raise OptionError(f"{{0}} {literal(repr(spec))}: expected error:EPS or mac:R", "fc_budgets")
    try:
        return parse_budget(spec)
    except OptionError:
        raise OptionError(f"{{0}} {literal(repr(spec))}: expected error:EPS or mac:R", "fc_budgets") from None


def parse_peer(spec: str) -> tuple[str, float | None]:
    """'dws' | 'uniform:G' | 'ssvd[:R]' | 'prune[:R]' | 'int8' | 'gdws+int8' | 'fc-kronecker' |
    'fc-lowrank' -> (peer, G or R or None). Bare ssvd / prune are placed at the GDWS points' conv
    MACs (`matched_points`); with R > 1, at conv MACs / R."""
    name, _, arg = spec.partition(":")
    expected = f"expected one of {', '.join(PEERS).replace('uniform', 'uniform:G')} (ssvd:R, prune:R: at MACs / R)"
    if name not in PEERS or (name == "uniform" and not arg) or (arg and name not in (*MAC_PEERS, "uniform")):
        raise OptionError(f"{{0}} {literal(repr(spec))}: {expected}", "peers")
    if not arg:
        return name, None
    if name == "uniform":
        if not arg.isdigit() or int(arg) < 1:
            raise OptionError(f"{{0}} {literal(repr(spec))}: G must be a positive integer", "peers")
        return name, int(arg)
    try:
        r = float(arg)
    except ValueError:
        r = 0.0
    if not r > 1:
        raise OptionError(f"{{0}} {literal(repr(spec))}: R must be a number > 1 (conv MACs / R)", "peers")
    return name, r


def mac_peer(name: str, reduction: float) -> PointSpec:
    """Spatial SVD or filter pruning at conv MACs / reduction."""
    params = {"mac_reduction": round(reduction, 4)}
    if name == "prune":
        params["multiple"] = PRUNE_MULTIPLE
    return PointSpec(name, params, f"{name} mac:{reduction:.3g}")


def plan_points(opts: SweepOptions) -> list[PointSpec]:
    """The original, the GDWS ladder, then the peers that do not depend on measured GDWS points.
    With quantized peers the original is evaluated a second time with Square added, the
    reference for them (their BPDA gradients are approximate, so Square joins the attacks)."""
    pts = [PointSpec("original", {}, "original")]
    pts += [PointSpec("gdws", parse_budget(b), f"gdws {b}") for b in opts.budgets]
    pts += [PointSpec("gdws", dict(params), f"gdws {label}") for label, params in opts.points
            if not quantized_point(params)]
    if quantized_methods(opts) and opts.attacks and "square" not in opts.attacks:
        pts.append(PointSpec("original", {"square": True}, "original+square"))  # after the float points: slow
    # named points that optimize quantizes (e.g. under --target latency, timed against INT8 alone)
    pts += [PointSpec("gdws+int8", dict(params), f"gdws {label}") for label, params in opts.points
            if quantized_point(params)]
    for p in opts.peers:
        name, g = parse_peer(p)
        if name == "dws":
            pts.append(PointSpec("dws", {"uniform_rank": 1}, "dws"))
        elif name == "uniform":
            pts.append(PointSpec("uniform", {"uniform_rank": g}, f"uniform g={g}"))
        elif name in MAC_PEERS and g is not None:
            pts.append(mac_peer(name, g))
        elif name == "int8":
            pts.append(PointSpec("int8", {"activations": QUANTIZE_ACTIVATIONS}, "int8"))
        elif name in FC_PEERS:
            pts += [PointSpec(name, parse_fc_budget(b), f"{name} {b}") for b in opts.fc_budgets]
    return pts


def quantized_point(params: dict) -> bool:
    """A named point whose optimize options quantize the model (`quantize` set)."""
    return params.get("quantize", "off") != "off"


def quantized_methods(opts: SweepOptions) -> list[str]:
    """The quantized methods of the sweep: INT8 peers, and GDWS + INT8 for quantized named points."""
    names = {parse_peer(p)[0] for p in opts.peers} & set(QUANTIZED)
    if any(quantized_point(params) for _, params in opts.points):
        names.add("gdws+int8")
    return sorted(names)


def extra_attacks(opts: SweepOptions) -> list[str]:
    """The attacks the sweep runs beyond `opts.attacks`, on which points, and why (said before any
    work starts and kept in the result)."""
    quantized = quantized_methods(opts)
    if not quantized or not any(a in WHITE_BOX for a in opts.attacks) or "square" in opts.attacks:
        return []
    q = ValidateOptions().queries
    return [f"Square ({q} queries per sample, ONNX Runtime forward passes only) also runs on the quantized "
            f"points ({', '.join(quantized)}): their white-box gradients through QuantizeLinear/DequantizeLinear "
            "are straight-through (BPDA) estimates, so a gradient-free attack backs them up; and on a second "
            "evaluation of the original ('original+square'), their reference, so that both face the same attacks."]


def matched_points(opts: SweepOptions, gdws: list[PointResult]) -> list[PointSpec]:
    """Peers placed at measured GDWS points: spatial SVD and filter pruning at the same conv-MAC
    reduction, and each GDWS model quantized to INT8."""
    names = {name for name, arg in map(parse_peer, opts.peers) if arg is None}
    pts = []
    for r in gdws:
        if r.status != "ok" or (opts.match_at and r.label not in opts.match_at):
            continue
        for peer in MAC_PEERS:
            if peer in names and r.conv_mac_reduction and r.conv_mac_reduction > 1.0 + 1e-6:
                pts.append(mac_peer(peer, r.conv_mac_reduction))
        if "gdws+int8" in names:
            pts.append(PointSpec("gdws+int8", {"from": r.key, **r.params, "activations": QUANTIZE_ACTIVATIONS},
                                 f"{r.label} + int8"))
    return pts


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of floating-point and 8-bit initializers (index tensors not counted)."""
    kinds = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
             onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in kinds))


def total_conv_macs(model: onnx.ModelProto) -> int:
    """Conv MACs per sample (quantized models: counted on their float weights' shapes)."""
    return int(sum(conv_macs(model).values()))


def total_fc_macs(model: onnx.ModelProto) -> int | None:
    """Gemm and MatMul MACs per sample (output elements x inner dimension, shapes by ONNX shape
    inference, unknown leading dims counted as 1), the FC rewrites' factor MatMuls included;
    None when a Gemm/MatMul's shapes are unknown."""
    shapes = infer_shapes(model)
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not out:
            return None
        trans_a = node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
        inner = a[0] if trans_a else a[-1]
        if inner is None or any(d is None for d in out[1:]):
            return None
        total += int(np.prod([d or 1 for d in out], dtype=np.int64)) * int(inner)
    return total



def fingerprint(model_sha: str, spec: PointSpec, opts: SweepOptions) -> str:
    """What a point's numbers depend on; a stored point with another fingerprint is redone."""
    measure = opts.measurement()
    if spec.quantized and opts.n_quantized:
        measure["n_quantized"] = opts.n_quantized
    blob = json.dumps({"model": model_sha, "method": spec.method, "params": spec.params,
                       "measure": measure}, sort_keys=True, default=json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Sweep:
    """`run()` builds and measures every point of one model into `out_dir`, resuming."""

    def __init__(self, model_path: str, out_dir: str, opts: SweepOptions,
                 progress: ProgressFactory | None = None, log: Callable[[str], None] | None = None):
        opts.check()
        check_attack_requirements(opts.attacks)  # before loading anything
        opts.calibration = opts.calibration_spec()
        self.path, self.out, self.opts = model_path, out_dir, opts
        self.progress = progress
        self.log = log or (lambda s: None)
        self.original = load_model(model_path).model
        self.sha = file_sha256(model_path)
        self.x, self.y = self._samples("data", opts.data, opts.n, labels=True)
        self._calibration: np.ndarray | None = None
        self._baselines: dict[bool, ModelResult] = {}  # with Square added? -> the original's evaluation
        self._baseline_seconds: dict[bool, float] = {}  # wall time of an evaluation made in this run
        self.original_macs = total_conv_macs(self.original)
        self.original_fc_macs = total_fc_macs(self.original)
        for sub in ("points", "models", "baselines"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

    @staticmethod
    def _samples(param: str, spec: str, n: int, labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The first n samples of the data set `spec` given as option `param` (and its labels)."""
        try:
            ds = load_dataset(spec, n=n)
        except (DataError, ValueError, OSError) as e:
            raise OptionError(f"{{0}} {literal(spec)}: {literal(e)}", param) from None
        if labels and ds.y is None:
            raise OptionError(f"{{0}} {literal(spec)} has no labels; the sweep measures accuracy", param)
        return np.ascontiguousarray(ds.x, np.float32), None if ds.y is None else np.asarray(ds.y, np.int64)

    def calibration(self) -> np.ndarray:
        if self._calibration is None:
            self._calibration, _ = self._samples("calibration", self.opts.calibration_spec(),
                                                 self.opts.calibration_n, False)
        return self._calibration

    # -- building ------------------------------------------------------------------------

    def build(self, spec: PointSpec, done: dict[str, PointResult]) -> tuple[onnx.ModelProto, dict]:
        """The point's model and facts known from building it (e.g. the float parent's MACs)."""
        if spec.method == "original":
            return self.original, {}
        if spec.method in ("gdws", "dws", "uniform"):
            return self.optimized(spec.params)[0], {}
        if spec.method in FC_PEERS:
            model, report = optimize(self.original, conv="off", fc=FC_PEERS[spec.method], verify=False,
                                     **spec.params)
            return model, {"fc_rewrite": report.fc.to_dict() if report.fc is not None else None}
        if spec.method in ("ssvd", "prune"):
            peer = peers.SpatialSVDPass if spec.method == "ssvd" else peers.PruneChannelsPass
            copy = onnx.ModelProto()
            copy.CopyFrom(self.original)  # the pass edits in place
            return peer(skip_first=self.opts.skip_first, **spec.params).call(copy).model, {}
        if spec.method == "int8":
            return (peers.QuantizeInt8Pass(self.calibration(), activation_type=spec.params["activations"])
                    .call(self.original).model, {"float_parent": "original"})
        if spec.method == "gdws+int8" and "from" not in spec.params:  # a named point optimize quantizes
            model, report = self.optimized(spec.params)
            # its float GDWS model's conv MACs, from the report (the QDQ model's weights are not folded)
            return model, {"conv_macs": report.conv_macs_after or 0}
        if spec.method == "gdws+int8":
            parent = os.path.join(self.out, "models", spec.params["from"] + ".onnx")
            if not os.path.isfile(parent):
                raise GDWSError(f"the GDWS point {spec.params['from']} has no saved model")
            return (peers.QuantizeInt8Pass(self.calibration(), activation_type=spec.params["activations"])
                    .call(onnx.load(parent)).model, {"float_parent": spec.params["from"]})
        raise GDWSError(f"unknown sweep method {spec.method!r}")

    def optimized(self, params: dict):
        """optimize() on the original with a point's options, timed on the sweep's EP, batches and
        threads (skip_first: the sweep's unless the point sets it); no verification."""
        return optimize(self.original, **{"skip_first": self.opts.skip_first, **params}, verify=False,
                        ep=self.opts.ep, batches=list(self.opts.batches), threads=self.opts.threads)

    # -- measuring -----------------------------------------------------------------------

    def _validate_options(self) -> ValidateOptions:
        o = self.opts
        return ValidateOptions(data=o.data, n=o.n, attacks=tuple(o.attacks), eps=o.eps, steps=o.steps,
                               seed=o.seed, threads=o.threads)

    def samples(self, quantized: bool) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation samples of a point: all n, or the first n_quantized for quantized points."""
        n = self.opts.n_quantized if quantized and self.opts.n_quantized else len(self.x)
        return self.x[:n], self.y[:n]

    def baseline(self, square: bool = False) -> ModelResult:
        """The original's evaluation (`square`: with Square added, the quantized points' reference),
        per sample. Kept in `baselines/` under its fingerprint, so that a resumed sweep that adds
        points compares them with the stored evaluation instead of attacking the original again."""
        if square not in self._baselines:
            spec = PointSpec("original", {"square": True} if square else {}, "original+square" if square else "original")
            path, fp = os.path.join(self.out, "baselines", spec.key + ".json"), fingerprint(self.sha, spec, self.opts)
            stored = _read_json(path)
            try:
                kept = ModelResult(**stored["result"]) if stored and stored.get("fingerprint") == fp else None
            except (TypeError, KeyError):  # written by another version
                kept = None
            if kept is not None:
                self._baselines[square] = kept
            else:
                t0, (x, y) = time.perf_counter(), self.samples(square)
                self._baselines[square] = evaluate_model(self.original, self.path, x, y,
                                                         self._validate_options(), [], "original", self.progress,
                                                         quantized_pair=square)[0]
                _write_json_atomic(path, {"fingerprint": fp, "result": asdict(self._baselines[square])})
                self._baseline_seconds[square] = time.perf_counter() - t0
        return self._baselines[square]

    def measure(self, spec: PointSpec, model: onnx.ModelProto, facts: dict, done: dict[str, PointResult],
                phases: dict[str, float]) -> PointResult:
        """Save and measure the point's model; adds the wall time of each phase to `phases`."""
        key = spec.key
        path = os.path.join(self.out, "models", key + ".onnx")
        save_model(model, path)
        res = PointResult(key=key, label=spec.label or spec.method, method=spec.method, params=spec.params,
                          status="ok", model_file=os.path.relpath(path, self.out),
                          file_bytes=os.path.getsize(path), parameters=count_parameters(model))
        parent = facts.get("float_parent")
        if "conv_macs" in facts:
            res.conv_macs, res.fc_macs = facts["conv_macs"], None
        elif parent == "original":
            res.conv_macs, res.fc_macs = self.original_macs, self.original_fc_macs
        elif parent:
            res.conv_macs, res.fc_macs = done[parent].conv_macs, done[parent].fc_macs
        else:
            res.conv_macs, res.fc_macs = total_conv_macs(model), total_fc_macs(model)
        res.conv_mac_reduction = self.original_macs / res.conv_macs if res.conv_macs else None
        if res.fc_macs and self.original_fc_macs:
            res.fc_mac_reduction = self.original_fc_macs / res.fc_macs
        warnings: list[str] = []
        res.fc_rewrite = facts.get("fc_rewrite")
        if spec.method in FC_PEERS:
            warnings += fc_warnings(res.fc_rewrite)
        base = self.baseline(spec.quantized)
        evaluated = self._baseline_seconds.pop(spec.quantized, None)
        if evaluated is not None and spec.method != "original":  # e.g. settings changed: evaluated here
            phases["reference"] = evaluated
        res.reference = "original+square" if spec.quantized else "original"
        if spec.method == "original":
            r = base
        else:
            x, y = self.samples(spec.quantized)
            r, _ = evaluate_model(model, path, x, y, self._validate_options(), warnings, res.label,
                                  self.progress, quantized_pair=spec.quantized)
        for name, s in r.timings.items():
            if name in ("clean", "gradient_check"):
                phases[name] = s
            elif not name.endswith("_model"):
                phases[f"attack {name}"] = s
        res.samples = len(r.predictions)
        res.clean, res.clean_interval = r.clean_accuracy, r.clean_accuracy_interval
        res.robust, res.robust_interval = r.robust_accuracy, r.robust_accuracy_interval
        res.robust_by_attack, res.gradient_source = r.robust_accuracy_by_attack, r.gradient_source
        res.agreement = proportion(np.asarray(r.predictions) == np.asarray(base.predictions)).value
        if r.robust_correct is not None and base.robust_correct is not None:
            res.robust_mcnemar_p = mcnemar_exact(base.robust_correct, r.robust_correct).p_value
        res.warnings = warnings
        res.phases = phases
        t0 = time.perf_counter()
        self.time(res, model)
        phases["timing"] = time.perf_counter() - t0
        return res

    def time(self, res: PointResult, model: onnx.ModelProto) -> None:
        """Latency ratio to the original at every batch, interleaved (sets res.latency)."""
        res.latency, res.original_ms, res.timing = {}, {}, self.opts.timing()
        for b in self.opts.batches:
            if res.method == "original":
                res.latency[f"b{b}"] = [1.0, 1.0, 1.0, 1.0, 1.0]
                continue
            cfg = BenchConfig(ep=self.opts.ep, batch=b, threads=self.opts.threads, runs=self.opts.runs)
            _, (ratio,) = compare_models([self.original, model], ["original", res.key], cfg)
            res.latency[f"b{b}"] = [ratio.median, ratio.p10, ratio.p90, *ratio.bounds()]
            res.original_ms[f"b{b}"] = ratio.baseline_ms

    # -- the loop ------------------------------------------------------------------------

    def _point_path(self, key: str) -> str:
        return os.path.join(self.out, "points", key + ".json")

    def _load_point(self, spec: PointSpec, fp: str) -> PointResult | None:
        d = _read_json(self._point_path(spec.key))
        try:
            res = PointResult(**d) if d is not None else None
        except TypeError:
            res = None
        if res is None:
            return None
        model_ok = res.status != "ok" or os.path.isfile(os.path.join(self.out, res.model_file))
        return res if res.fingerprint == fp and model_ok else None

    def run_point(self, spec: PointSpec, done: dict[str, PointResult]) -> PointResult:
        fp = fingerprint(self.sha, spec, self.opts)
        cached = self._load_point(spec, fp)
        if cached is not None and cached.status != "ok":
            if not self.opts.retry_failed:  # a failure under the same fingerprint is deterministic
                self.log(OptionText(f"{literal(spec.label)}: failed before, skipped ({{0}} to rebuild it): "
                                    f"{literal(cached.error)}",
                                    "retry_failed=True"))
                return cached
            cached = None
        if cached is not None and (self.opts.retime or cached.timing != self.opts.timing()):
            self.log(f"{spec.label}: accuracy done before; re-timing")
            t0 = time.perf_counter()
            self.time(cached, onnx.load(os.path.join(self.out, cached.model_file)))
            cached.phases = {**cached.phases, "timing": time.perf_counter() - t0}
            _write_json_atomic(self._point_path(spec.key), asdict(cached))
            return cached
        if cached is not None:
            self.log(f"{spec.label}: done before, skipped")
            return cached
        t0 = time.perf_counter()
        self.log(f"{spec.label}: building and measuring")
        phases: dict[str, float] = {}
        try:
            model, facts = self.build(spec, done)
            if spec.method != "original":  # the original is not built
                phases["build"] = time.perf_counter() - t0
            res = self.measure(spec, model, facts, done, phases)
        except (GDWSError, GateFailed) as e:  # recorded and reported; the other points go on
            res = PointResult(key=spec.key, label=spec.label, method=spec.method, params=spec.params,
                              status="failed", error=str(e), phases=phases)
            self.log(f"{spec.label}: failed: {e}")
        res.seconds = time.perf_counter() - t0
        if res.status == "ok":
            self.log(f"{spec.label}: done in {res.seconds:.1f} s ({format_phases(res.phases)})")
        res.fingerprint = fp
        _write_json_atomic(self._point_path(spec.key), asdict(res))
        return res

    def run(self, command: str = "") -> SweepResult:
        start = time.perf_counter()
        planned = plan_points(self.opts)
        matched = sorted({name for name, arg in map(parse_peer, self.opts.peers) if arg is None}
                         & {*MAC_PEERS, "gdws+int8"})
        self.log(f"{len(planned)} points: {', '.join(s.label for s in planned)}"
                 + (f"; then {', '.join(matched)} at " + (', '.join(self.opts.match_at) if self.opts.match_at
                                                           else "each GDWS point") if matched else ""))
        extra = extra_attacks(self.opts)
        for line in extra:
            self.log(line)
        done: dict[str, PointResult] = {}
        for spec in planned:
            done[spec.key] = self.run_point(spec, done)
        gdws = [r for r in done.values() if r.method == "gdws"]
        for spec in matched_points(self.opts, gdws):
            done[spec.key] = self.run_point(spec, done)
        env = environment(BenchConfig(ep=self.opts.ep, threads=self.opts.threads))
        env["versions"] = versions()
        result = SweepResult(model=self.path, model_sha256=self.sha, options=asdict(self.opts), environment=env,
                             points=list(done.values()), command=command, extra_attacks=extra,
                             seconds=time.perf_counter() - start)
        _write_json_atomic(os.path.join(self.out, "sweep.json"), result.to_dict())
        return result


def fc_warnings(fc_rewrite: dict | None) -> list[str]:
    """What an FC point should say about its rewrite: no Gemm/MatMul rewritten, and why not."""
    if fc_rewrite and fc_rewrite["rewritten"]:
        return []
    why = "; ".join(f"{s['layer']}: {s['reason']}" for s in (fc_rewrite or {}).get("skipped", []))
    return ["no Gemm/MatMul layer was rewritten, the point is the original" + (f" ({why})" if why else "")]


def format_phases(phases: dict[str, float]) -> str:
    """'build 1.2 s, clean 0.3 s, gradient check 0.8 s, attack pgd 20.1 s, timing 19.6 s'."""
    return ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items())


def _write_json_atomic(path: str, obj: dict) -> None:
    write_json_atomic(path, obj, indent=1, default=json_default)


def _read_json(path: str) -> dict | None:
    """What `_write_json_atomic` wrote, or None when there is no such file or it does not parse."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def sweep(model_path: str, out_dir: str, opts: SweepOptions | None = None, *, command: str = "",
          progress: ProgressFactory | None = None, log: Callable[[str], None] | None = None, **kwargs
          ) -> SweepResult:
    """Build and measure every point (resuming from `out_dir`); keyword arguments set SweepOptions."""
    opts = opts or SweepOptions()
    for k, v in kwargs.items():
        if not hasattr(opts, k):
            raise TypeError(f"sweep() got an unexpected keyword argument {k!r}")
        setattr(opts, k, tuple(v) if isinstance(v, list) else v)
    return Sweep(model_path, out_dir, opts, progress, log).run(command)


def load_sweep(path: str) -> SweepResult:
    """A sweep.json (or the folder holding it) back as a SweepResult."""
    if os.path.isdir(path):
        path = os.path.join(path, "sweep.json")
    with open(path) as f:
        d = json.load(f)
    d["points"] = [PointResult(**p) for p in d["points"]]
    return SweepResult(**d)
