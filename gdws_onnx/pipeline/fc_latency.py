"""FC layers under target="latency": a Gemm/MatMul is rewritten only where its factored form is
measurably faster than the dense layer, and the FC rewrites together keep the model never slower.

Per eligible layer, both schemes' factors at the error budget (graph.fc.plan_fc, which also
compares them on error per MAC) are each timed alone against the dense layer
(graph.fc.fc_layer_model at the layer's real input shape, its rows' dim set to each batch: the
first, or the last of a Gemm with transA=1), interleaved, with pipeline.measure's probes, cache
and rule: "faster" means the whole confidence interval of the median per-round ratio lies below
measure.FASTER, at every batch. The requested scheme's form is kept where it is faster; the
report names the scheme that won on measured latency (or "dense"). The kept layers then pass
measure.never_slower against the model as it entered the FC step (its convs already rewritten
and checked): a layer is reverted, worst measured layer ratio first, until the whole model
measures faster at every batch, else all stay dense.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import onnx

from gdws_onnx.core.kronecker import SCHEMES, FCFactors
from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.convs import infer_shapes
from gdws_onnx.graph.fc import (
    MIN_WEIGHT,
    FCPlan,
    FCReport,
    FCRewritePass,
    FCSite,
    fc_layer_model,
    fc_skip_reason,
    find_fc_sites,
    plan_fc,
)
from gdws_onnx.pipeline.candidates import name_filter
from gdws_onnx.pipeline.measure import (
    CONFIDENCE,
    FASTER,
    FallbackStep,
    LatencyCache,
    Probe,
    conclusive,
    default_cache_path,
    environment_key,
    faster,
    layer_probes,
    never_slower,
)
from gdws_onnx.pipeline.options import BudgetOptions, RunOptions, SelectionOptions, TimingOptions
from gdws_onnx.runtime.bench import format_ratio, ratio_of
from gdws_onnx.runtime.session import probe_shapes

DENSE = "dense"  # the latency winner when no factored form is measurably faster


@dataclass
class FCOption:
    """One scheme's factors of a layer, timed against the dense layer."""

    scheme: str
    structure: str  # FCFactors.describe()
    error: float  # relative squared Frobenius error of the weight
    macs: int  # per input row
    measured: dict[int, dict] = field(default_factory=dict)  # batch -> bench.Ratio (factored / dense) as a dict

    @property
    def faster(self) -> bool:
        """Measurably faster than FASTER x the dense layer at every batch."""
        return bool(self.measured) and all(faster(r, FASTER) for r in self.measured.values())

    @property
    def worst(self) -> dict:
        """The measurement at the batch with the highest median ratio."""
        return max(self.measured.values(), key=lambda r: r["median"])


@dataclass
class FCLayerTiming:
    """A layer's timed options (the requested scheme first), the latency winner, and whether it was kept."""

    options: list[FCOption]
    winner: str  # the measurably faster scheme with the lowest worst-batch median ratio, else DENSE
    kept: bool = False  # rewritten in the returned model (measured faster, and not reverted by the whole-model check)


@dataclass
class FCLatencyReport:
    """What the FC step measured under target="latency" (FCSummary.latency is its to_dict())."""

    ep: str
    batches: list[int]
    threads: int | None
    environment: dict
    cache: dict
    layers: dict[str, FCLayerTiming] = field(default_factory=dict)
    checks: list[FallbackStep] = field(default_factory=list)  # the whole-model never-slower check
    faster: bool = False  # the whole model measured faster with the kept FC layers
    message: str = ""
    layer_threshold: float = FASTER
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict:
        d = asdict(self)
        d["baseline"] = "the model as it entered the FC step (convs already rewritten)"
        return d


def latency_winner(options: list[FCOption]) -> str:
    """Of the options measurably faster than the dense layer, the scheme with the lowest
    worst-batch median ratio; DENSE when none is."""
    fast = [o for o in options if o.faster]
    return min(fast, key=lambda o: o.worst["median"]).scheme if fast else DENSE


def fc_cache_key(site: FCSite, shape: list[int], factors: FCFactors, env: dict) -> str:
    """A layer measurement's key in the latency cache: environment, the dense layer's form and
    input shape (batch included), and the factored form."""
    layer = dict(fc=site.op, out=site.out_features, inp=site.in_features, trans_b=site.trans_b,
                 alpha=site.alpha, beta=site.beta, bias=bool(site.bias), shape=list(shape),
                 dtype=str(site.weight.dtype), form=factors.describe())
    if site.trans_a:  # only then, so that the keys of the other layers stay as they were
        layer["trans_a"] = True
    blob = json.dumps({"env": env, "layer": layer}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def timeable(dims: list[int | None], rank: int, batch_axis: int = 0) -> bool:
    """The dims a layer is timed at are known: all but the batch's (FCSite.batch_axis, set when
    timed), or the only one of a 1-D input."""
    if len(dims) != rank:
        return False
    return all(dims) if rank == 1 else all(d for i, d in enumerate(dims) if i != batch_axis % rank)


def input_shapes_of(model: onnx.ModelProto, sites: list[FCSite], run: RunOptions) -> dict[str, list[int] | str]:
    """Each site's input dims (its batch's, FCSite.batch_axis, is replaced when timed), by ONNX shape
    inference at `run.input_shapes`, else from one ONNX Runtime run; a string says why unknown."""
    shapes = infer_shapes(model, run.input_shapes)
    dims = {s.name: shapes.get(s.node.input[0], []) for s in sites}
    unknown = [s for s in sites if not timeable(dims[s.name], s.input_rank, s.batch_axis)]
    if unknown:
        why = "its input shape is unknown (give input_shapes)"
        try:
            probed = probe_shapes(model, [s.node.input[0] for s in unknown], run.input_shapes, run.threads)
        except GDWSError as e:
            probed, why = {}, f"{why}: {e}"
        for s in unknown:
            dims[s.name] = probed.get(s.node.input[0]) or why
    return {name: d if isinstance(d, str) else [int(x or 1) for x in d] for name, d in dims.items()}


def at_batch(shape: list[int], batch: int, axis: int = 0) -> list[int]:
    """The input shape at `batch` (its dim `axis`, FCSite.batch_axis; a 1-D input has none)."""
    out = list(shape)
    if len(out) > 1:
        out[axis] = batch
    return out


def measure_fc_layer(site: FCSite, shape: list[int], forms: list[FCFactors], probes: dict[int, Probe],
                     cache: LatencyCache, env: dict) -> list[FCOption]:
    """Time each factored form alone against the dense layer at every batch (interleaved, until
    its interval decides FASTER or the probe's limits are reached). Cached with its interval; a
    cached entry that did not decide is measured again."""
    dense = {b: fc_layer_model(site, at_batch(shape, b, site.batch_axis)) for b in probes}
    options = []
    for f in forms:
        option = FCOption(f.scheme, f.describe(), f.error, f.macs)
        for batch, probe in probes.items():
            key = fc_cache_key(site, at_batch(shape, batch, site.batch_axis), f, env)
            hit = cache.get(key, usable=conclusive)
            if hit is None:
                candidate = fc_layer_model(site, at_batch(shape, batch, site.batch_axis), f)
                hit = asdict(probe.compare(dense[batch], candidate, threshold=FASTER))
                cache.put(key, hit)
            option.measured[batch] = asdict(ratio_of(hit))
        options.append(option)
    return options


def timed_forms(plan: FCPlan, min_weight: int, only_if_cheaper: bool) -> list[FCFactors]:
    """The plan's factors, then the other scheme's at the same budget where it may rewrite the site."""
    forms = [plan.factors]
    for other in SCHEMES:
        f = plan.comparison.chosen(other) if plan.comparison is not None else None
        if other != plan.factors.scheme and f is not None and fc_skip_reason(plan.site, other, min_weight) is None \
                and not (only_if_cheaper and f.macs >= plan.site.macs):
            forms.append(f)
    return forms


def not_faster_reason(option: FCOption, ep: str) -> str:
    """Why a timed layer stays dense, with its measured ratio at the worst batch."""
    return f"not measurably faster on {ep} (layer ratio {format_ratio(option.worst)})"


def with_layers(model: onnx.ModelProto, plans: list[FCPlan]) -> onnx.ModelProto:
    """A copy of the model with the planned FC layers rewritten (plans of sites of this model)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    return FCRewritePass(plans).call(copy).model if plans else copy


def rewrite_fc_by_latency(model: onnx.ModelProto, base_dir: str, selection: SelectionOptions,
                          budget: BudgetOptions, timing: TimingOptions, run: RunOptions,
                          min_weight: int = MIN_WEIGHT) -> tuple[FCReport, FCLatencyReport]:
    """Rewrite (in place) the Gemm/MatMul layers by `selection.fc` at `budget.error` where their
    factored form measures faster alone on `timing.ep` at every batch, and the kept ones
    together make the model measurably faster than without them (module docstring). The
    FCReport has a row per rewritten layer and, for every other layer, why not; the
    FCLatencyReport every measurement and which scheme won on measured latency."""
    scheme = selection.fc
    sites = find_fc_sites(model, base_dir, run.input_shapes)
    skipped = [(s.name, why) for s in sites if (why := name_filter(s.name, selection))]
    sites = [s for s in sites if s.name not in dict(skipped)]
    plans, not_planned = plan_fc(sites, scheme, budget.error, None, min_weight, not budget.force)
    skipped += not_planned
    env = environment_key(timing.ep, run.threads)
    cache = LatencyCache(default_cache_path() if timing.cache is None else (timing.cache or None))
    lat = FCLatencyReport(ep=timing.ep, batches=list(timing.batches), threads=run.threads, environment=env,
                          cache={})
    fast: list[FCPlan] = []
    if plans:
        shapes = input_shapes_of(model, [p.site for p in plans], run)
        probes = layer_probes(timing, run, "layer")
        for p in plans:
            shape = shapes[p.site.name]
            if isinstance(shape, str):
                skipped.append((p.site.name, shape))
                continue
            options = measure_fc_layer(p.site, shape, timed_forms(p, min_weight, not budget.force), probes, cache,
                                       env)
            lat.layers[p.site.name] = FCLayerTiming(options, latency_winner(options))
            if options[0].faster:
                fast.append(p)
            else:
                skipped.append((p.site.name, not_faster_reason(options[0], timing.ep)))
        cache.save()
    lat.cache = {"path": cache.path, "hits": cache.hits, "misses": cache.misses}
    kept = keep_never_slower(model, fast, lat, timing, run)
    skipped += [(p.site.name, "reverted: the whole model was not faster with it") for p in fast if p not in kept]
    for p in kept:
        lat.layers[p.site.name].kept = True
    lat.message = fc_outcome_message(bool(fast), bool(kept), scheme, timing.ep)
    report = FCRewritePass(kept, min_weight).call(model).report if kept else FCReport()
    report.skipped[:0] = skipped
    return report, lat


def keep_never_slower(model: onnx.ModelProto, fast: list[FCPlan], lat: FCLatencyReport, timing: TimingOptions,
                      run: RunOptions) -> list[FCPlan]:
    """measure.never_slower over the layers measured faster alone, worst measured layer ratio
    reverted first, against `model` as it is; records its steps in `lat`; returns the kept plans."""
    if not fast:
        return []
    by_name = {p.site.name: p for p in fast}
    worst_first = sorted(by_name, key=lambda n: -lat.layers[n].options[0].worst["median"])
    check = never_slower(model, lambda names: with_layers(model, [by_name[n] for n in names]), worst_first,
                         layer_probes(timing, run, "model"))
    lat.checks, lat.faster = check.steps, check.faster
    return [by_name[n] for n in check.kept] if check.faster else []


def fc_outcome_message(any_fast: bool, kept: bool, scheme: str, ep: str) -> str:
    """'' when FC layers were kept, else why every one stays dense."""
    if kept:
        return ""
    if not any_fast:
        return f"no FC layer is measurably faster in {scheme} form on {ep}: every one stays dense"
    return "no FC rewrite made the whole model faster: every FC layer stays dense"

