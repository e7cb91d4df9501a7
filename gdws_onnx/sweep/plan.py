"""What a sweep builds: its options, the budget and peer specs, and the points they plan.

A point is a method and its parameters (`PointSpec`): the original, GDWS at a budget, a named
set of optimize() options (GDWS or, with conv="ssvd", spatial SVD; + INT8 when it quantizes),
and the peers (DWS, uniform rank, spatial SVD and pruning at a MAC cut, INT8, GDWS + INT8, the
FC rewrites). `plan_points` lists those known before anything is measured;
`matched_points` adds the peers placed at measured GDWS points. `fingerprint` names what a
point's numbers depend on, so that a resumed sweep knows which stored points still hold.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from gdws_onnx.errors import OptionError, literal
from gdws_onnx.eval.validation import WHITE_BOX, ValidateOptions
from gdws_onnx.pipeline.int8 import QUANTIZE_ACTIVATIONS
from gdws_onnx.provenance import json_default

if TYPE_CHECKING:
    from gdws_onnx.sweep.results import PointResult

BUDGET_KINDS = {"error": "error_budget", "mac": "mac_reduction", "latency": "latency_reduction"}
FC_PEERS = {"fc-kronecker": "kronecker", "fc-lowrank": "lowrank"}  # peer -> optimize(fc=...), convs off
PEERS = ("dws", "uniform", "ssvd", "prune", "int8", "gdws+int8", *FC_PEERS)
QUANTIZED = ("int8", "gdws+int8", "ssvd+int8")  # attacked with BPDA gradients plus Square, like their reference
DEFAULT_BUDGETS = ("error:0.02", "error:0.05", "error:0.1", "error:0.2", "mac:1.5", "mac:2", "mac:3", "mac:4")
# the FC peers' own ladder: error:E = each FC weight's relative squared Frobenius error,
# mac:R = each FC layer's MACs / R (no latency budget: the FC rewrite does not measure layers)
FC_BUDGET_KINDS = ("error", "mac")
DEFAULT_FC_BUDGETS = ("error:0.02", "error:0.05", "error:0.1", "error:0.2", "mac:2", "mac:4")
DEFAULT_PEERS = ("dws", "uniform:2", "uniform:4", "ssvd", "prune", "int8", "gdws+int8")
# optimize() options a named point may not set: the sweep sets them (timing) or they do not apply
POINT_FIXED = {"ep", "batches", "threads", "verify", "max_error", "input_shapes", "probe_factory"}
POINT_CONVS = ("gdws", "ssvd")  # the conv rewrites of named points (conv="off": the int8 and fc-* peers)
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
    # named points beyond the budget ladder (GDWS, or spatial SVD with conv="ssvd"): (label, optimize()
    # keyword options), e.g.
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
    # None: each point's accuracy in one piece; N: in shards of N samples, each seeded from `seed`
    # and its index like `evaluate` (the numbers depend on N, never on where the shards run: Ray or here)
    shard_size: int | None = None

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
            if params.get("conv", "gdws") not in POINT_CONVS:
                raise OptionError(f"{{0}} {literal(repr(label))}: conv={literal(params['conv'])} is not a point's "
                                  f"conv rewrite ({', '.join(POINT_CONVS)}; INT8 alone and the FC rewrites are "
                                  "{1})", "points", "peers")
        if self.n_quantized is not None and not 1 <= self.n_quantized <= self.n:
            raise OptionError("{0} must be between 1 and {1}", "n_quantized", "n")
        known = {f"gdws {b}" for b in self.budgets} | {f"gdws {label}" for label, params in self.points
                                                         if named_method(params) == "gdws"}
        missing = [m for m in self.match_at if m not in known]
        if missing:
            raise OptionError(f"{{0}} {literal(', '.join(map(repr, missing)))}: not a GDWS point of this sweep "
                              f"({literal(', '.join(sorted(known)))})", "match_at")
        if self.shard_size is not None and self.shard_size < 1:
            raise OptionError("{0} must be >= 1", "shard_size")
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
        if d["shard_size"] is None:  # in one piece: the fingerprint of sweeps from before shards
            d.pop("shard_size")
        return d

    def timing(self) -> dict:
        """The settings a point's latency ratios depend on; other values -> re-timed, not rebuilt."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if k in self.LATENCY_FIELDS}


@dataclass
class PointSpec:
    """One model to build: a method and its parameters."""

    # original | gdws | dws | uniform | ssvd | prune | int8 | gdws+int8 | ssvd+int8 | fc-kronecker | fc-lowrank
    method: str
    params: dict = field(default_factory=dict)
    label: str = ""

    @property
    def quantized(self) -> bool:
        return self.method in QUANTIZED or bool(self.params.get("square"))

    @property
    def key(self) -> str:
        """A file-name-safe, unique name."""
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.label or self.method)


def parse_budget(spec: str) -> dict:
    """'error:0.05' | 'mac:2' | 'latency:1.2' -> optimize() keyword options."""
    kind, _, value = spec.partition(":")
    try:
        v = float(value)
    except ValueError:
        v = None
    if kind not in BUDGET_KINDS or v is None:
        raise OptionError(f"{{0}} {literal(repr(spec))}: expected error:EPS, mac:R or latency:R", "budgets")
    # error and MAC points are planned by MACs (timed afterwards by the sweep), latency points by timing
    return {BUDGET_KINDS[kind]: v, "target": "latency" if kind == "latency" else "macs"}


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
    pts += [named_point(label, params) for label, params in opts.points if not quantized_point(params)]
    if quantized_methods(opts) and opts.attacks and "square" not in opts.attacks:
        pts.append(PointSpec("original", {"square": True}, "original+square"))  # after the float points: slow
    # named points that optimize quantizes (e.g. under --target latency, timed against INT8 alone)
    pts += [named_point(label, params) for label, params in opts.points if quantized_point(params)]
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


def named_method(params: dict) -> str:
    """The method of a named point (optimize() options): its conv rewrite, + int8 when quantized."""
    conv = params.get("conv", "gdws")
    return f"{conv}+int8" if quantized_point(params) else conv


def named_point(label: str, params: dict) -> PointSpec:
    """A named point, labelled by its conv rewrite: 'gdws LABEL' or 'ssvd LABEL'."""
    return PointSpec(named_method(params), dict(params), f"{params.get('conv', 'gdws')} {label}")


def quantized_point(params: dict) -> bool:
    """A named point whose optimize options quantize the model (`quantize` set)."""
    return params.get("quantize", "off") != "off"


def quantized_methods(opts: SweepOptions) -> list[str]:
    """The quantized methods of the sweep: INT8 peers, and GDWS or spatial SVD + INT8 for quantized
    named points."""
    names = {parse_peer(p)[0] for p in opts.peers} & set(QUANTIZED)
    names |= {named_method(params) for _, params in opts.points if quantized_point(params)}
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


def fingerprint(model_sha: str, spec: PointSpec, opts: SweepOptions) -> str:
    """What a point's numbers depend on; a stored point with another fingerprint is redone."""
    measure = opts.measurement()
    if spec.quantized and opts.n_quantized:
        measure["n_quantized"] = opts.n_quantized
    blob = json.dumps({"model": model_sha, "method": spec.method, "params": spec.params,
                       "measure": measure}, sort_keys=True, default=json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
