"""Hardware-aware allocation: per-layer latency tables measured on the target EP (cached on
disk), rank choice under a latency or error budget, and the never-slower whole-model check.

A `Probe` measures candidate / baseline latency (interleaved); `bench.OrtProbe` is the real
one, tests inject their own. Nothing here decides by MACs alone, nor by a median alone: "faster
than T" means the confidence interval of the median per-round ratio lies below T
(`bench.verdict`), at every batch; an interval that straddles T is "not measurably faster".
Layers must beat FASTER, whole models and folds 1.0, a latency budget R 1/R.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from gdws_onnx.core import allocate, decompose
from gdws_onnx.runtime.bench import Ratio, format_ratio, ratio_of, verdict
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.graph.fold import FoldGatherPass
from gdws_onnx.graph.rewrite import layer_model
from gdws_onnx.pipeline.candidates import DEFAULT_ERROR_BUDGET, Candidate

LADDER = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # G / C points measured per layer
FASTER = 0.95  # a layer is kept only if the upper bound of its measured ratio is below this
WIDTH_MULTIPLES = (8, 16)  # GDWS widths also measured rounded up to these
CONFIDENCE = 0.95  # of the interval every "faster" decision rests on (bench.Rounds, over all its looks)


class Probe(Protocol):
    def compare(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto,
                threshold: float | tuple[float, ...] | None = None) -> Ratio:
        """candidate / baseline latency; given a threshold (or several), measure until the
        Ratio's interval lies on one side of it (of each), as far as the probe's limits allow."""
        ...


def faster(r: Ratio | dict, threshold: float) -> bool:
    """Measurably below threshold: the whole interval of the median ratio is below it."""
    return verdict(r if isinstance(r, Ratio) else ratio_of(r), threshold) == "below"


@dataclass
class LayerOption:
    """One measured GDWS realization of a layer."""

    ranks: np.ndarray
    multiplier: bool
    error: float  # sum_c alpha_c ||W_c - Q_c||^2
    ratios: dict[int, float]  # batch -> median(gdws / original) latency
    baseline_ms: float  # original layer at the first batch
    gdws_ms: float
    measured: dict[int, dict] = field(default_factory=dict)  # batch -> bench.Ratio as a dict

    @property
    def worst_ratio(self) -> float:
        return max(self.ratios.values())

    @property
    def faster(self) -> bool:
        """Measurably faster than FASTER x the original at every batch."""
        return all(faster(r, FASTER) for r in self.measured.values())

    @property
    def worst(self) -> dict:
        """The measurement at the batch with the highest median ratio."""
        return max(self.measured.values(), key=lambda r: r["median"])

    @property
    def saving_ms(self) -> float:
        return self.baseline_ms - self.gdws_ms


class LatencyCache:
    """Layer measurements on disk, keyed by EP, CPU, ORT version, threads, batch and geometry."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.hits = self.misses = 0
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    self.entries = json.load(f)
            except (OSError, ValueError):
                self.entries = {}  # a corrupt cache is rebuilt, not fatal

    @staticmethod
    def key(site: ConvSite, option: tuple[int, bool], batch: int, env: dict) -> str:
        geometry = dict(C=site.in_channels, M=site.out_channels, groups=site.group, kernel=site.kernel_shape,
                        strides=site.strides, pads=site.pads, dilations=site.dilations, auto_pad=site.auto_pad,
                        spatial=site.in_spatial, dtype=str(site.weight.dtype), G=option[0], mult=option[1],
                        batch=batch)
        blob = json.dumps({"env": env, "layer": geometry}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, key: str, usable: Callable[[dict], bool] | None = None) -> dict | None:
        """The entry under key if there is one and `usable` accepts it (a miss otherwise)."""
        hit = self.entries.get(key)
        if hit is not None and usable is not None and not usable(hit):
            hit = None
        self.hits += hit is not None
        self.misses += hit is None
        return hit

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value

    def save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.entries, f, sort_keys=True)
        os.replace(tmp, self.path)


def default_cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "onnx-gdws", "latency.json")


def realizations(spec: decompose.Spectrum, scores: np.ndarray, ranks: np.ndarray,
                 multiplier: bool = True) -> list[tuple[np.ndarray, bool]]:
    """The forms of one rank choice that are measured: Gather + depthwise at its own width G and
    with G rounded up to each of WIDTH_MULTIPLES (the padding filled with the next best terms:
    less error, and ORT's CPU convs are much faster at such widths), and the channel-multiplier
    form; only those with fewer MACs than the conv."""
    original = decompose.original_cost_per_pixel(spec)
    out, seen = [], set()
    for m in (1, *WIDTH_MULTIPLES):
        r = allocate.round_width(scores, ranks, spec.channel_group(), m)
        if tuple(r) not in seen and decompose.gdws_cost_per_pixel(spec, r) < original:
            seen.add(tuple(r))
            out.append((r, False))
    if multiplier and decompose.multiplier_cost_per_pixel(spec, ranks) < original:
        out.append((np.asarray(ranks), True))
    return out


def candidate_ranks(spec: decompose.Spectrum, scores: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """The ladder measured for a layer under a latency budget: MEGO ranks at G = t C (each in
    its `realizations`), and uniform rank r in channel-multiplier form."""
    out, seen = [], set()
    for t in LADDER:
        ranks = allocate.mego(scores, max(1, int(round(t * spec.in_channels))))
        for r, mult in realizations(spec, scores, ranks, multiplier=False):
            if tuple(r) not in seen:
                seen.add(tuple(r))
                out.append((r, mult))
    original = decompose.original_cost_per_pixel(spec)
    for r in range(1, spec.max_rank + 1):
        ranks = np.full(spec.in_channels, r)
        if decompose.multiplier_cost_per_pixel(spec, ranks) < original:
            out.append((ranks, True))
    return out


def conclusive(entry: dict) -> bool:
    """A cached layer measurement that can be reused: it has its spread (older entries held a
    median only) and its interval (`Ratio.bounds`) decides the FASTER question; others are
    measured again."""
    if any(entry.get(k) is None for k in _CACHED):
        return False
    return verdict(ratio_of(entry), FASTER) != "undecided"


_CACHED = ("median", "p10", "p90", "baseline_ms", "candidate_ms")


def measure_layer(site: ConvSite, spec: decompose.Spectrum, alpha: np.ndarray,
                  choices: list[tuple[np.ndarray, bool]], probes: dict[int, Probe],
                  cache: LatencyCache, env: dict) -> list[LayerOption]:
    """Time each realization against the original layer, at every batch, until its interval
    decides FASTER or the probe's limits are reached. Cached with its spread and interval; a
    cached entry that did not decide is measured again."""
    options = []
    originals = {b: layer_model(site, b) for b in probes}
    for ranks, mult in choices:
        measured: dict[int, dict] = {}
        for batch, probe in probes.items():
            key = LatencyCache.key(site, (int(ranks.sum()), mult), batch, env)
            hit = cache.get(key, usable=conclusive)
            if hit is None:
                f = decompose.factors(spec, ranks, site.weight.dtype, multiplier=mult)
                hit = asdict(probe.compare(originals[batch], layer_model(site, batch, f), threshold=FASTER))
                cache.put(key, hit)
            measured[batch] = asdict(ratio_of(hit))
        first = measured[next(iter(probes))]
        options.append(LayerOption(ranks, mult, decompose.weighted_error(spec, ranks, alpha),
                                   {b: r["median"] for b, r in measured.items()},
                                   first["baseline_ms"], first["candidate_ms"], measured))
    return options


def pick_for_error_budget(options: list[LayerOption], max_error: float) -> LayerOption | None:
    """The fastest measured option within the error budget, if it is measurably faster."""
    ok = [o for o in options if o.error <= max_error and o.faster]
    return min(ok, key=lambda o: o.worst_ratio) if ok else None


def pick_for_latency(layers: list[list[LayerOption]], required_ms: float) -> tuple[list[LayerOption | None], bool]:
    """Least total error whose measured layer savings reach `required_ms` (first batch);
    only options measurably faster at every batch compete."""
    usable = [[o for o in opts if o.faster] for opts in layers]
    table = [[(0.0, 0.0)] + [(o.saving_ms, o.error) for o in opts] for opts in usable]
    choice, met = allocate.choose_options(table, required_ms)
    return [usable[i][j - 1] if j else None for i, j in enumerate(choice)], met


@dataclass
class FallbackStep:
    """One whole-model measurement of the never-slower check."""

    rewritten: list[str]
    ratios: dict[int, dict]  # batch -> Ratio as a dict
    reverted: str = ""  # layer reverted after this step, if the model was not faster


@dataclass
class NeverSlowerResult:
    kept: list[str]
    steps: list[FallbackStep] = field(default_factory=list)
    faster: bool = False


def never_slower(original: onnx.ModelProto, build: Callable[[list[str]], onnx.ModelProto],
                 layers_worst_first: list[str], probes: dict[int, Probe],
                 also: tuple[float, ...] = ()) -> NeverSlowerResult:
    """Measure original vs optimized at every batch; unless every batch is measurably faster
    (interval of the median ratio below 1), revert the layer with the worst measured layer
    ratio and measure again. With nothing left, the original is kept: the result is never a
    model that did not measure faster. `also`: further thresholds each measurement should
    settle (a latency budget's 1/R), so that its interval says whether the budget is met."""
    kept = list(layers_worst_first)
    result = NeverSlowerResult(kept=[])
    while kept:
        candidate = build(kept)
        ratios = {b: p.compare(original, candidate, threshold=(1.0, *also)) for b, p in probes.items()}
        step = FallbackStep(rewritten=list(kept), ratios={b: asdict(r) for b, r in ratios.items()})
        result.steps.append(step)
        if all(faster(r, 1.0) for r in ratios.values()):
            result.kept, result.faster = kept, True
            return result
        step.reverted = kept.pop(0)
    return result


@dataclass
class FoldTrial:
    """One measured choice between a layer's Gather and folding it into its producer."""

    layer: str
    producer: str
    ratios: dict[int, dict]  # batch -> bench.Ratio (folded / not folded whole-model latency) as a dict
    folded: bool


def choose_folds(build: Callable[[list[str]], onnx.ModelProto], probes: dict[int, Probe]
                 ) -> tuple[list[FoldTrial], onnx.ModelProto]:
    """Greedy, in graph order: fold a layer's Gather into its producer (fold.py) only if the whole
    model measures faster with the fold at every batch (interval below 1). `build(layers)` is the model with
    those layers' Gathers folded. Returns the trials and the model with the accepted folds."""
    current = build([])
    foldable = FoldGatherPass()
    foldable.call(onnx.ModelProto.FromString(current.SerializeToString()))
    trials, folded = [], []
    for layer, producer in foldable.folded.items():
        trial = build(folded + [layer])
        ratios = {b: asdict(p.compare(current, trial, threshold=1.0)) for b, p in probes.items()}
        ok = all(faster(r, 1.0) for r in ratios.values())
        trials.append(FoldTrial(layer, producer, ratios, ok))
        if ok:
            folded.append(layer)
            current = trial
    return trials, current


def environment_key(ep: str, threads: int | None) -> dict:
    """What a cached layer latency depends on besides the layer itself."""
    from gdws_onnx.runtime.bench import BenchConfig, environment

    env = environment(BenchConfig(ep=ep, threads=threads))
    return {"ep": ep, "cpu": env["cpu"], "cpus": env["cpus"], "threads": threads or 0, "ort": ort.__version__}


def _probes(opts, kind: str) -> dict[int, Probe]:
    from gdws_onnx.runtime.bench import BenchConfig, OrtProbe, Rounds

    out = {}
    for b in opts.batches:
        if opts.probe_factory is not None:
            out[b] = opts.probe_factory(b, kind)
        else:
            shapes = opts.input_shapes if kind == "model" else {}
            out[b] = OrtProbe(BenchConfig(ep=opts.ep, batch=b, threads=opts.threads, runs=opts.runs,
                                          warmup=3, input_shapes=shapes, seed=opts.seed),
                              rounds=Rounds(max_rounds=max(opts.max_rounds, opts.runs),
                                            max_seconds=opts.measure_seconds, confidence=CONFIDENCE))
    return out


def plan(cands: list[Candidate], model: onnx.ModelProto, opts) -> tuple:
    """Choose each candidate's ranks and realization by measured latency (sets `ranks`,
    `multiplier`, `measured_ratio` or `reason` on each) and run the never-slower check.

    Returns (BudgetReport, latency report dict). `model` is the unmodified original."""
    from gdws_onnx.errors import GDWSError
    from gdws_onnx.pipeline.report import BudgetReport
    from gdws_onnx.graph.rewrite import GDWSRewritePass, LayerRewrite

    unknown = [c.site.name for c in cands if c.site.in_spatial is None]
    if unknown:
        raise GDWSError("--target latency measures each conv at its real input shape, unknown for "
                        f"{unknown[:3]}: give --input-shape NAME:DIMS")
    layer_probes, model_probes = _probes(opts, "layer"), _probes(opts, "model")
    env = environment_key(opts.ep, opts.threads)
    cache = LatencyCache(default_cache_path() if opts.cache is None else (opts.cache or None))
    measured: dict[str, list[LayerOption]] = {}
    eps = None
    for c in cands:
        sc = decompose.scores(c.spec, c.alpha)
        if opts.latency_reduction is None:

            eps = DEFAULT_ERROR_BUDGET if opts.error_budget is None else opts.error_budget
            ranks, beta = allocate.relative_lego(sc, eps, c.site.weight.dtype)
            choices = realizations(c.spec, sc, ranks)
        else:
            choices = candidate_ranks(c.spec, sc)
        measured[c.site.name] = measure_layer(c.site, c.spec, c.alpha, choices, layer_probes, cache, env)

    original_bytes = model.SerializeToString()
    spec_of = {c.site.name: c for c in cands}

    def build_options(chosen: dict[str, LayerOption]) -> onnx.ModelProto:
        m = onnx.ModelProto.FromString(original_bytes)
        rewrites = [LayerRewrite(_site_in(m, spec_of[n].site),
                                 decompose.factors(spec_of[n].spec, o.ranks, spec_of[n].site.weight.dtype,
                                                   o.multiplier)) for n, o in chosen.items()]
        return GDWSRewritePass(rewrites).call(m)

    picks: dict[str, LayerOption | None] = {}
    met, searches, baseline_ms = True, [], None
    if opts.latency_reduction is None:
        for c in cands:
            _, beta = allocate.relative_lego(decompose.scores(c.spec, c.alpha), eps, c.site.weight.dtype)
            picks[c.site.name] = pick_for_error_budget(measured[c.site.name], beta)
    else:
        picks, met, baseline_ms, searches = _search_latency_budget(
            cands, measured, opts.latency_reduction, model, build_options, model_probes[opts.batches[0]])

    for c in cands:
        o = picks.get(c.site.name)
        if o is None:
            best = min(measured[c.site.name], key=lambda m: ratio_of(m.worst).bounds()[1], default=None)
            c.reason = (f"not measurably faster on {opts.ep}" +
                        (f" (best layer ratio {format_ratio(best.worst)})" if best is not None
                         else " (no cheaper form)")
                        if best is None or not any(m.faster for m in measured[c.site.name])
                        else "not needed for the latency budget")
        else:
            c.ranks, c.multiplier, c.measured_ratio = o.ranks, o.multiplier, o.ratios

    chosen_cands = sorted([c for c in cands if not c.reason], key=lambda c: -max(c.measured_ratio.values()))

    def build(names: list[str]) -> onnx.ModelProto:
        return build_options({n: picks[n] for n in names})

    budget_bound = () if opts.latency_reduction is None else (1 / opts.latency_reduction,)
    check = never_slower(model, build, [c.site.name for c in chosen_cands], model_probes, also=budget_bound)
    for c in chosen_cands:
        if c.site.name not in check.kept:
            c.reason = "reverted: the whole model was not faster with it"
    trials, last = choose_folds(lambda folded: FoldGatherPass(folded).call(build(check.kept)),
                                model_probes) if check.faster else ([], None)
    folded = {t.layer for t in trials if t.folded}
    final = check.steps[-1].ratios if check.faster else {}
    if folded:  # the returned model is the folded one: it too must measure faster than the original
        ratios = {b: asdict(p.compare(model, last, threshold=(1.0, *budget_bound))) for b, p in model_probes.items()}
        if all(faster(r, 1.0) for r in ratios.values()):
            final = ratios
        else:
            folded = set()
    for c in cands:
        c.fold = c.site.name in folded
    cache.save()
    # the measured whole-model speed-up (original / optimized latency, worst batch's median)
    speedup = 1 / max(r["median"] for r in final.values()) if final else None
    if opts.latency_reduction is None:  # achieved (the largest layer error) is set by optimize
        budget = BudgetReport(mode="error", target=eps, achieved=None)
    else:
        budget = BudgetReport(mode="latency", target=opts.latency_reduction, achieved=speedup, met=met,
                              message="" if met else "the latency budget cannot be met by layers that are "
                                                     "measurably faster; kept every one that is")
        if final and budget.met and not all(faster(r, 1 / opts.latency_reduction) for r in final.values()):
            budget.met = False
            budget.message = (f"measured whole-model speed-up {speedup:.2f}x is not measurably "
                              f"{opts.latency_reduction:g}x or more (layer times do not add up exactly in the model)")
    report = {
        "ep": opts.ep, "batches": opts.batches, "threads": opts.threads, "environment": env,
        "cache": {"path": cache.path, "hits": cache.hits, "misses": cache.misses},
        "model_baseline_ms": baseline_ms, "budget_search": searches,
        "faster": check.faster, "final_ratios": final, "speedup": speedup,
        "layer_threshold": FASTER, "confidence": CONFIDENCE,
        "layers": {c.site.name: _layer_entry(measured[c.site.name], picks.get(c.site.name)) for c in cands},
        "checks": [asdict(s) for s in check.steps],
        "fold_trials": [asdict(t) for t in trials], "folded": sorted(folded),
        "message": "" if check.faster or not chosen_cands else
        "no rewrite made the whole model faster: the original is returned unchanged",
    }
    if not chosen_cands:
        report["message"] = f"no conv is measurably faster in GDWS form on {opts.ep}: the model is unchanged"
    return budget, report


def _layer_entry(options: list[LayerOption], chosen: LayerOption | None) -> dict:
    """A layer's measured options for the report, and the index of the chosen one (None: none)."""
    return {"options": [{"total_rank": int(o.ranks.sum()), "multiplier": o.multiplier, "error": o.error,
                         "ratios": o.measured} for o in options],
            "chosen": next((i for i, o in enumerate(options) if o is chosen), None)}


def _search_latency_budget(cands: list, measured: dict[str, list[LayerOption]], target: float,
                           model: onnx.ModelProto, build: Callable[[dict], onnx.ModelProto], probe: Probe,
                           steps: int = 6) -> tuple[dict, bool, float, list[dict]]:
    """Least-error choice whose *whole model* measures below 1/target of the original (the
    interval of its median ratio below 1/target).

    Layer savings measured in isolation do not add up to the model's (session overheads,
    fused neighbours), so the saving asked of the layer table is bisected against
    whole-model measurements. Returns (picks, met, baseline ms, search log)."""
    layers = [measured[c.site.name] for c in cands]
    names = [c.site.name for c in cands]
    max_saving = sum(max([o.saving_ms for o in opts if o.faster] + [0.0]) for opts in layers)
    baseline_ms = probe.compare(model, model).baseline_ms
    lo, hi = 0.0, max_saving
    required = min(baseline_ms * (1 - 1 / target), max_saving)
    log, best = [], None
    for _ in range(steps):
        chosen, _ = pick_for_latency(layers, required)
        picks = {n: o for n, o in zip(names, chosen) if o is not None}
        r = probe.compare(model, build(picks), threshold=1 / target) if picks else None
        log.append({"required_layer_saving_ms": required, "layers": len(picks),
                    "model_ratio": asdict(r) if r else None})
        if r is not None and faster(r, 1 / target):
            best, hi = picks, required
        else:
            lo = required
            if required >= max_saving:
                break
        required = (lo + hi) / 2 if best is not None else min(max(2 * required, lo + 1e-9), max_saving)
    if best is None:  # not reachable: keep everything measurably faster, at the largest saving
        chosen, _ = pick_for_latency(layers, max_saving)
        return {n: o for n, o in zip(names, chosen) if o is not None}, False, baseline_ms, log
    return best, True, baseline_ms, log


def _site_in(model: onnx.ModelProto, site: ConvSite) -> ConvSite:
    """The same conv site bound to another copy of the model (same node index)."""
    return ConvSite(**{**site.__dict__, "node": model.graph.node[site.index]})
