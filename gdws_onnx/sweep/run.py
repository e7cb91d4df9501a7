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

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import onnx

from gdws_onnx import peers
from gdws_onnx.core.stats import mcnemar_exact, proportion
from gdws_onnx.data import DataError, load_dataset
from gdws_onnx.errors import GateFailed, GDWSError, OptionError, OptionText, literal
from gdws_onnx.eval.validation import (
    ModelResult,
    ProgressFactory,
    ValidateOptions,
    check_attack_requirements,
    evaluate_model,
)
from gdws_onnx.eval.sharded import LocalRunner, Runner
from gdws_onnx.eval.sharded import evaluate as evaluate_sharded
from gdws_onnx.files import write_json_atomic
from gdws_onnx.graph.convs import infer_shapes
from gdws_onnx.graph.model_io import file_sha256, load_model, save_model
from gdws_onnx.pipeline.optimize import optimize
from gdws_onnx.provenance import json_default, versions
from gdws_onnx.runtime.bench import BenchConfig, compare_models, conv_macs, environment
from gdws_onnx.sweep.plan import (
    FC_PEERS,
    MAC_PEERS,
    PointSpec,
    SweepOptions,
    extra_attacks,
    fingerprint,
    matched_points,
    parse_peer,
    plan_points,
)
from gdws_onnx.sweep.results import PointResult, SweepResult


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


class Sweep:
    """`run()` builds and measures every point of one model into `out_dir`, resuming."""

    def __init__(self, model_path: str, out_dir: str, opts: SweepOptions,
                 progress: ProgressFactory | None = None, log: Callable[[str], None] | None = None,
                 runner: Runner | None = None):
        opts.check()
        if runner is not None and opts.shard_size is None:
            raise OptionError("a runner evaluates shards: give {0}", "shard_size")
        self.runner = runner
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
        if spec.method in ("ssvd", "ssvd+int8") and "conv" in spec.params:  # a named point: optimize builds it
            model, report = self.optimized(spec.params)
            return model, ({"conv_macs": report.conv_macs_after or 0} if spec.method == "ssvd+int8" else {})
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
                self._baselines[square] = self.evaluate(self.original, self.path, x, y, [], "original", square)
                _write_json_atomic(path, {"fingerprint": fp, "result": asdict(self._baselines[square])})
                self._baseline_seconds[square] = time.perf_counter() - t0
        return self._baselines[square]

    def evaluate(self, model: onnx.ModelProto, path: str, x: np.ndarray, y: np.ndarray, warnings: list[str],
                 label: str, quantized: bool) -> ModelResult:
        """One model's clean and robust accuracy on x, y: in one piece, or with `shard_size` in
        seeded shards on the runner (Ray workers or this process: the same numbers); appends the
        evaluation's warnings to `warnings`."""
        if self.opts.shard_size is None:
            return evaluate_model(model, path, x, y, self._validate_options(), warnings, label, self.progress,
                                  quantized_pair=quantized)[0]
        runner = self.runner or LocalRunner(self.opts.threads)
        result = evaluate_sharded(model, self._validate_options(), shard_size=self.opts.shard_size, runner=runner,
                                  progress=self.progress, quantized_pair=quantized, x=x, y=y)
        warnings += [w for w in result.warnings if w not in warnings]
        return result.result

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
            r = self.evaluate(model, path, x, y, warnings, res.label, spec.quantized)
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
          progress: ProgressFactory | None = None, log: Callable[[str], None] | None = None,
          runner: Runner | None = None, **kwargs) -> SweepResult:
    """Build and measure every point (resuming from `out_dir`); keyword arguments set SweepOptions.
    `runner` (with `shard_size`) runs the accuracy shards, e.g. `eval.ray_runner.RayRunner`;
    latency is always measured here, on the machine the sweep runs on."""
    opts = opts or SweepOptions()
    for k, v in kwargs.items():
        if not hasattr(opts, k):
            raise TypeError(f"sweep() got an unexpected keyword argument {k!r}")
        setattr(opts, k, tuple(v) if isinstance(v, list) else v)
    return Sweep(model_path, out_dir, opts, progress, log, runner).run(command)
