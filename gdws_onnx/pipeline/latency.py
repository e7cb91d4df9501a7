"""Hardware-aware allocation of the convs: each candidate layer's GDWS realizations timed alone
on the target EP (`measure`: probes, cache, the "faster" rule), rank choice under a latency or
error budget, Gather folds, and the never-slower whole-model check.

Nothing here decides by MACs alone, nor by a median alone: "faster than T" means the confidence
interval of the median per-round ratio lies below T (`measure.faster`), at every batch. Layers
must beat FASTER, whole models and folds 1.0, a latency budget R 1/R.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import onnx

from gdws_onnx.core import allocate, decompose
from gdws_onnx.errors import OptionError, literal
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.graph.fold import FoldGatherPass
from gdws_onnx.graph.rewrite import GDWSRewritePass, LayerRewrite, layer_model
from gdws_onnx.pipeline.candidates import BudgetPlan, Candidate
from gdws_onnx.pipeline.latency_table import LatencyTable
from gdws_onnx.pipeline.measure import (
    CONFIDENCE,
    FASTER,
    LatencyCache,
    NeverSlowerResult,
    Probe,
    conclusive,
    default_cache_path,
    environment_key,
    faster,
    layer_probes,
    never_slower,
)
from gdws_onnx.pipeline.options import BudgetOptions, RunOptions, TimingOptions
from gdws_onnx.pipeline.report import BudgetReport, LatencyReport
from gdws_onnx.runtime.bench import format_ratio, ratio_of

LADDER = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # G / C points measured per layer
FORMS = ("gather", "multiplier", "stacked")  # [Gather ->] grouped dw -> pw; multiplier dw -> pw; r dw -> Concat -> pw
WIDTH_MULTIPLES = (8, 16)  # GDWS widths also measured rounded up to these


@dataclass
class LayerOption:
    """One measured GDWS realization of a layer."""

    ranks: np.ndarray
    form: str  # one of FORMS
    error: float  # sum_c alpha_c ||W_c - Q_c||^2
    ratios: dict[int, float]  # batch -> median(gdws / original) latency
    baseline_ms: float  # original layer at the first batch
    gdws_ms: float
    measured: dict[int, dict] = field(default_factory=dict)  # batch -> bench.Ratio as a dict

    @property
    def multiplier(self) -> bool:
        """Every channel padded to the same number of kernels (no Gather)."""
        return self.form != "gather"

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


def padded_forms(spec: decompose.Spectrum) -> tuple[str, ...]:
    """The forms that pad every channel to r kernels: the channel-multiplier conv, and, for an
    ungrouped conv, the stacked form (r true depthwise convs, concatenated: ORT's x86 NCHWc
    transformer blocks a depthwise conv whose channels are a multiple of its block, never a
    multiplier conv)."""
    return ("multiplier", "stacked") if spec.groups == 1 else ("multiplier",)


def realizations(spec: decompose.Spectrum, scores: np.ndarray, ranks: np.ndarray,
                 multiplier: bool = True) -> list[tuple[np.ndarray, str]]:
    """The forms of one rank choice that are measured: Gather + depthwise at its own width G and
    with G rounded up to each of WIDTH_MULTIPLES (the padding filled with the next best terms:
    less error, and ORT's CPU convs are much faster at such widths), and the `padded_forms`;
    only those with fewer MACs than the conv."""
    original = decompose.original_cost_per_pixel(spec)
    out, seen = [], set()
    for m in (1, *WIDTH_MULTIPLES):
        r = allocate.round_width(scores, ranks, spec.channel_group(), m)
        if tuple(r) not in seen and decompose.gdws_cost_per_pixel(spec, r) < original:
            seen.add(tuple(r))
            out.append((r, "gather"))
    if multiplier and decompose.multiplier_cost_per_pixel(spec, ranks) < original:
        out += [(np.asarray(ranks), form) for form in padded_forms(spec)]
    return out


def candidate_ranks(spec: decompose.Spectrum, scores: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """The ladder measured for a layer under a latency budget: MEGO ranks at G = t C (each in
    its `realizations`), and uniform rank r in each of the `padded_forms`."""
    out, seen = [], set()
    for t in LADDER:
        ranks = allocate.mego(scores, max(1, int(round(t * spec.in_channels))))
        for r, form in realizations(spec, scores, ranks, multiplier=False):
            if tuple(r) not in seen:
                seen.add(tuple(r))
                out.append((r, form))
    original = decompose.original_cost_per_pixel(spec)
    for r in range(1, spec.max_rank + 1):
        ranks = np.full(spec.in_channels, r)
        if decompose.multiplier_cost_per_pixel(spec, ranks) < original:
            out += [(ranks, form) for form in padded_forms(spec)]
    return out


def form_factors(spec: decompose.Spectrum, ranks: np.ndarray, dtype: np.dtype, form: str) -> decompose.GDWSFactors:
    """The GDWS factors of ranks in a form of FORMS."""
    return decompose.factors(spec, ranks, dtype, multiplier=form != "gather", stacked=form == "stacked")


def measure_layer(site: ConvSite, spec: decompose.Spectrum, alpha: np.ndarray,
                  choices: list[tuple[np.ndarray, str]], probes: dict[int, Probe],
                  cache: LatencyCache, env: dict) -> list[LayerOption]:
    """Time each realization against the original layer, at every batch, until its interval
    decides FASTER or the probe's limits are reached. Cached with its spread and interval; a
    cached entry that did not decide is measured again."""
    options = []
    originals = {b: layer_model(site, b) for b in probes}
    for ranks, form in choices:
        measured: dict[int, dict] = {}
        for batch, probe in probes.items():
            key = LatencyCache.key(site, (int(ranks.sum()), form), batch, env)
            hit = cache.get(key, usable=conclusive)
            if hit is None:
                f = form_factors(spec, ranks, site.weight.dtype, form)
                hit = asdict(probe.compare(originals[batch], layer_model(site, batch, f), threshold=FASTER))
                cache.put(key, hit)
            measured[batch] = asdict(ratio_of(hit))
        options.append(layer_option(spec, alpha, ranks, form, measured))
    return options


def layer_option(spec: decompose.Spectrum, alpha: np.ndarray, ranks: np.ndarray, form: str,
                 measured: dict[int, dict]) -> LayerOption:
    """A realization with its error and its measurements (batch -> Ratio dict, first batch first)."""
    first = measured[next(iter(measured))]
    return LayerOption(ranks, form, decompose.weighted_error(spec, ranks, alpha),
                       {b: r["median"] for b, r in measured.items()}, first["baseline_ms"], first["candidate_ms"],
                       measured)


def table_options(c: Candidate, table: LatencyTable, batches: list[int]) -> list[LayerOption]:
    """`measure_layer` from a profiled table instead of a probe: every realization (total rank G,
    form) the table holds at each batch for this layer's geometry (looked up by `LatencyCache.key`
    under the table's environment), as the ranks optimize would build at that G: the MEGO ranks
    of this model's scores (Gather + depthwise), or G / C terms per channel (channel multiplier).
    A measurement that did not decide FASTER is used as it is (it counts as not faster): the
    device is not here to measure it again."""
    entries, sc, n = table.entries, decompose.scores(c.spec, c.alpha), c.spec.in_channels
    pairs = sorted({(m.total_rank, m.multiplier) for ms in table.layers.values() for m in ms})
    options = []
    for g, mult in pairs:
        keys = {b: LatencyCache.key(c.site, (g, mult), b, table.key_environment) for b in batches}
        if not all(k in entries for k in keys.values()) or (mult and g % n):
            continue
        ranks = np.full(n, g // n) if mult else allocate.mego(sc, g)
        if int(ranks.sum()) == g:
            options.append(layer_option(c.spec, c.alpha, ranks, "multiplier" if mult else "gather",
                                        {b: asdict(ratio_of(entries[k])) for b, k in keys.items()}))
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
    foldable = FoldGatherPass().call(onnx.ModelProto.FromString(current.SerializeToString())).report.folded
    trials, folded = [], []
    for layer, producer in foldable.items():
        trial = build(folded + [layer])
        ratios = {b: asdict(p.compare(current, trial, threshold=1.0)) for b, p in probes.items()}
        ok = all(faster(r, 1.0) for r in ratios.values())
        trials.append(FoldTrial(layer, producer, ratios, ok))
        if ok:
            folded.append(layer)
            current = trial
    return trials, current


@dataclass
class LatencyPlanner:
    """The budget planner of target="latency" (`budgets.PLANNERS`): `plan` below."""

    budget: BudgetOptions
    timing: TimingOptions
    run: RunOptions
    ranks: RanksPlanner | None = None  # fixes the ranks first (a mismatch budget); then only realizations are timed
    quantize: str = "off"  # "int8": time the INT8 forms (the whole-model baseline is then INT8 alone)

    def plan(self, cands: list[Candidate], sites: list[ConvSite], model: onnx.ModelProto) -> BudgetPlan:
        if self.ranks is None:
            return plan(cands, model, self.budget, self.timing, self.run, quantize=self.quantize)
        self.ranks.plan(cands, sites, model)
        allocated = [c for c in cands if c.ranks is not None and not c.reason]
        require_input_shapes([c.site for c in allocated])
        timers = Timers.create(self.timing, self.run, model, self.quantize)
        allocated, dropped = self.reallocate(allocated, sites, model, timers)
        result = plan(allocated, model, self.budget, self.timing, self.run, fixed_ranks=True, quantize=self.quantize,
                      timers=timers)
        result.budget = self.budget.requested()  # its achieved mismatch is set by optimize on the final ranks
        result.latency.layers.update(dropped)
        return result

    def reallocate(self, active: list[Candidate], sites: list[ConvSite], model: onnx.ModelProto,
                   timers: Timers) -> tuple[list[Candidate], dict[str, dict]]:
        """Give the accuracy budget to the layers that pay off: a layer none of whose realizations
        of its allocated ranks is measurably faster is left dense (its error leaves the bound), and
        the ranks planner allocates again over the others (fewer terms each: more speed), until
        every allocated layer has a faster form or after MAX_REALLOCATIONS rounds. Returns the
        final allocated candidates and the report entries of the dropped layers."""
        dropped: dict[str, dict] = {}
        for _ in range(MAX_REALLOCATIONS):
            slow = {}
            for c in active:
                options = measure_layer(c.site, c.spec, c.alpha, allocated_forms(c), timers.layer, timers.cache,
                                        timers.env)
                if pick_for_error_budget(options, allocated_error(c)) is None:
                    slow[c.site.name] = options
            keep = [c for c in active if c.site.name not in slow]
            if not slow or not keep:
                break
            for c in active:
                if c.site.name in slow:
                    c.reason = not_picked_reason(slow[c.site.name], self.timing.ep) + \
                        "; the accuracy budget went to the other layers"
                    dropped[c.site.name] = _layer_entry(slow[c.site.name], None)
                else:
                    c.ranks, c.reason = None, ""
            self.ranks.plan(keep, sites, model)
            active = [c for c in keep if c.ranks is not None and not c.reason]
        timers.cache.save()
        return active, dropped


@dataclass
class Timers:
    """What layer and whole-model timings go through: a probe per batch for each, the cache and
    the environment its keys carry. With quantize "int8" the probes compare INT8 forms
    (pipeline.int8.QuantizedProbe) and the keys say so, so INT8 timings never answer for float ones."""

    layer: dict[int, Probe]
    model: dict[int, Probe]
    env: dict
    cache: LatencyCache

    @classmethod
    def create(cls, timing: TimingOptions, run: RunOptions, model: onnx.ModelProto, quantize: str = "off") -> Timers:
        probes, model_probes = layer_probes(timing, run, "layer"), layer_probes(timing, run, "model")
        env = environment_key(timing.ep, run.threads)
        if quantize != "off":
            from gdws_onnx.pipeline.int8 import QuantizedProbe, calibration_inputs

            x, _ = calibration_inputs(model, run)
            probes = {b: QuantizedProbe(p) for b, p in probes.items()}
            model_probes = {b: QuantizedProbe(p, x) for b, p in model_probes.items()}
            env = {**env, "quantize": quantize}
        cache = LatencyCache(default_cache_path() if timing.cache is None else (timing.cache or None))
        return cls(probes, model_probes, env, cache)


MAX_REALLOCATIONS = 4  # rounds of `LatencyPlanner.reallocate`


class RanksPlanner(Protocol):
    """A budget planner that sets each candidate's `ranks` (or `reason`), e.g. budgets.MismatchPlanner."""

    def plan(self, cands: list[Candidate], sites: list[ConvSite], model: onnx.ModelProto) -> BudgetPlan: ...


@dataclass
class Picks:
    """Each layer's chosen measured option (None: left alone) and, under a latency budget, the search."""

    options: dict[str, LayerOption | None]
    met: bool = True  # a latency budget was reached by the layer table's search
    baseline_ms: float | None = None  # the original's whole-model time (latency budget)
    log: list[dict] = field(default_factory=list)  # the search's steps (latency budget)


@dataclass
class WholeModel:
    """The never-slower check of the chosen layers and the Gather folds measured after it."""

    check: NeverSlowerResult
    trials: list[FoldTrial]
    folded: set[str]
    final: dict[int, dict]  # batch -> Ratio dict of the returned model vs the original ({}: unchanged)

    @property
    def speedup(self) -> float | None:
        """Original / optimized latency at the worst batch's median; None when unchanged."""
        return 1 / max(r["median"] for r in self.final.values()) if self.final else None


def plan(cands: list[Candidate], model: onnx.ModelProto, budget: BudgetOptions, timing: TimingOptions,
         run: RunOptions, fixed_ranks: bool = False, quantize: str = "off",
         timers: Timers | None = None) -> BudgetPlan:
    """Choose each candidate's ranks and realization by measured latency (sets `ranks`,
    `multiplier`, `measured_ratio`, `fold` or `reason` on each) under the error budget or the
    latency budget of `budget`, and run the never-slower check. `model` is the unmodified original.
    With `fixed_ranks` each candidate's allocated ranks stay (no less accurate: the measured
    realizations only pad or add terms) and only their realizations are timed. With quantize
    "int8" every comparison is between INT8 forms (pipeline.int8.QuantizedProbe): a layer's INT8
    GDWS form against the INT8 layer, the whole model against INT8 alone.
    Returns the BudgetReport and the LatencyReport of what was measured."""
    require_input_shapes([c.site for c in cands])
    if timing.latency_table is not None:
        return plan_from_table(cands, budget, timing, LatencyTable.load(timing.latency_table))
    timers = timers or Timers.create(timing, run, model, quantize)
    probes, model_probes, env, cache = timers.layer, timers.model, timers.env, timers.cache
    eps = None if budget.latency_reduction is not None else budget.error
    choices = {c.site.name: allocated_forms(c) if fixed_ranks else layer_choices(c, eps) for c in cands}
    measured = {c.site.name: measure_layer(c.site, c.spec, c.alpha, choices[c.site.name], probes, cache, env)
                for c in cands}
    build = ModelBuilder(model, cands)
    if fixed_ranks:
        picks = Picks({c.site.name: pick_for_error_budget(measured[c.site.name], allocated_error(c)) for c in cands})
    elif eps is not None:
        picks = Picks({c.site.name: pick_for_error_budget(measured[c.site.name], error_allowance(c, eps))
                       for c in cands})
    else:
        picks = search_latency_budget(cands, measured, budget.latency_reduction, model, build.with_options,
                                      model_probes[timing.batches[0]])
    chosen = apply_picks(cands, picks.options, measured, timing.ep)
    bound = () if eps is not None else (1 / budget.latency_reduction,)
    whole = check_whole_model(model, lambda names: build.with_options({n: picks.options[n] for n in names}),
                              [c.site.name for c in chosen], model_probes, bound)
    for c in chosen:
        if c.site.name not in whole.check.kept:
            c.reason = "reverted: the whole model was not faster with it"
    for c in cands:
        c.fold = c.site.name in whole.folded
    cache.save()
    report = LatencyReport(
        ep=timing.ep, batches=timing.batches, threads=run.threads, environment=env,
        cache={"path": cache.path, "hits": cache.hits, "misses": cache.misses},
        model_baseline_ms=picks.baseline_ms, budget_search=picks.log, faster=whole.check.faster,
        final_ratios=whole.final, speedup=whole.speedup, layer_threshold=FASTER, confidence=CONFIDENCE,
        layers={c.site.name: _layer_entry(measured[c.site.name], picks.options.get(c.site.name)) for c in cands},
        checks=whole.check.steps, fold_trials=whole.trials, folded=sorted(whole.folded),
        message=outcome_message(bool(chosen), whole.check.faster, timing.ep, quantize))
    return BudgetPlan(budget_report(budget, picks, whole), report)


def plan_from_table(cands: list[Candidate], budget: BudgetOptions, timing: TimingOptions,
                    table: LatencyTable) -> BudgetPlan:
    """`plan` with every layer latency read from a table `onnx-gdws profile` measured on the
    device, nothing timed here: each layer chooses among the realizations the table holds for its
    geometry (`table_options`). The whole-model check and the Gather folds need the device: they
    are skipped, and the report says so. A latency budget is met as far as the table's layer
    savings predict against its whole-model time. Raises OptionError (on `latency_table`) when
    the table lacks a batch of `timing.batches`, holds the auto planner's forms, or has no
    realization of some candidate."""
    table.require("gdws", [], None, timing.batches, timing.latency_table)
    eps = None if budget.latency_reduction is not None else budget.error
    measured = {c.site.name: table_options(c, table, timing.batches) for c in cands}
    unmatched = [c.site.name for c in cands if not measured[c.site.name]]
    if unmatched:
        raise OptionError(f"{{0}} has no measurement of {literal(unmatched[:3])} at this geometry: it was profiled "
                          f"for model {literal(table.model.get('name'))} (other input shapes, or other {{1}}/"
                          "{2}/{3}?)", "latency_table", "skip_first", "include", "exclude")
    if eps is not None:
        picks = Picks({c.site.name: pick_for_error_budget(measured[c.site.name], error_allowance(c, eps))
                       for c in cands})
    else:
        baseline = table.model_ms[timing.batches[0]]
        chosen, met = pick_for_latency([measured[c.site.name] for c in cands],
                                       baseline * (1 - 1 / budget.latency_reduction))
        picks = Picks({c.site.name: o for c, o in zip(cands, chosen) if o is not None}, met, baseline)
    ep = table.key_environment.get("ep", timing.ep)  # the device's EP, whatever --ep says here
    chosen_cands = apply_picks(cands, picks.options, measured, ep)
    message = table_message(table, timing.latency_table, timing.batches)
    report = LatencyReport(
        ep=ep, batches=timing.batches, threads=table.key_environment.get("threads") or None,
        environment=table.key_environment,
        cache={"path": timing.latency_table, "hits": sum(len(v) for v in measured.values()), "misses": 0,
               "table": True},
        model_baseline_ms=picks.baseline_ms, budget_search=[], faster=False, final_ratios={}, speedup=None,
        layer_threshold=FASTER, confidence=CONFIDENCE,
        layers={c.site.name: _layer_entry(measured[c.site.name], picks.options.get(c.site.name)) for c in cands},
        checks=[], fold_trials=[], folded=[],
        message=message if chosen_cands else f"{outcome_message(False, False, ep)}; {message}")
    if eps is not None:
        return BudgetPlan(BudgetReport(mode="error", target=budget.error, achieved=None), report)
    return BudgetPlan(BudgetReport(mode="latency", target=budget.latency_reduction, achieved=None, met=picks.met,
                                   message="predicted from the layer table, not measured on the whole model"
                                   if picks.met else "the latency budget cannot be met by layers the table shows "
                                                     "measurably faster; kept every one that is"), report)


def table_message(table: LatencyTable, path: str, batches: list[int]) -> str:
    """Where the layer latencies came from, and that the whole-model check is left to the device."""
    env, ep = table.environment, table.key_environment.get("ep")
    where = f"{ep}, {env.get('cpu')}, onnxruntime {env.get('onnxruntime')} {env.get('onnxruntime_package', '')}"
    return (f"layer latencies from {path} (measured on {where.rstrip()}). The whole-model check was skipped: it "
            f"needs the device. There, time the optimized model against the original, interleaved, on the {ep} EP "
            f"at batch {','.join(map(str, batches))}")


def require_input_shapes(sites: list[ConvSite]) -> None:
    """Raise OptionError unless every conv's input shape is known (layers are timed at it)."""
    unknown = [s.name for s in sites if s.in_spatial is None]
    if unknown:
        raise OptionError("{0} latency measures each conv at its real input shape, unknown for "
                          f"{literal(unknown[:3])}: give {{1}} NAME:DIMS", "target", "input_shapes")


def error_allowance(c: Candidate, eps: float) -> float:
    """The weighted error a candidate may have under the per-layer relative error budget eps."""
    _, beta = allocate.relative_lego(decompose.scores(c.spec, c.alpha), eps, c.site.weight.dtype)
    return beta


def allocated_forms(c: Candidate) -> list[tuple[np.ndarray, str]]:
    """The realizations of a candidate's allocated ranks (a ranks planner set them)."""
    return realizations(c.spec, decompose.scores(c.spec, c.alpha), c.ranks)


def allocated_error(c: Candidate) -> float:
    """The weighted error of a candidate's allocated ranks, with float slack: its realizations
    (same or more terms) are all within it."""
    return decompose.weighted_error(c.spec, c.ranks, c.alpha) * (1 + 1e-9) + 1e-12


def layer_choices(c: Candidate, eps: float | None) -> list[tuple[np.ndarray, str]]:
    """The forms measured for a candidate: under an error budget eps the `realizations` of its
    error-budget ranks, under a latency budget (eps None) its whole `candidate_ranks` ladder."""
    sc = decompose.scores(c.spec, c.alpha)
    if eps is None:
        return candidate_ranks(c.spec, sc)
    ranks, _ = allocate.relative_lego(sc, eps, c.site.weight.dtype)
    return realizations(c.spec, sc, ranks)


class ModelBuilder:
    """Copies of the original model with chosen layers rewritten (and Gathers folded)."""

    def __init__(self, model: onnx.ModelProto, cands: list[Candidate]):
        self.original = model.SerializeToString()
        self.cands = {c.site.name: c for c in cands}

    def with_options(self, chosen: dict[str, LayerOption]) -> onnx.ModelProto:
        """The original with each named layer in its chosen measured form."""
        m = onnx.ModelProto.FromString(self.original)
        rewrites = [LayerRewrite(_site_in(m, self.cands[n].site),
                                 form_factors(self.cands[n].spec, o.ranks, self.cands[n].site.weight.dtype, o.form))
                    for n, o in chosen.items()]
        return GDWSRewritePass(rewrites).call(m).model


def apply_picks(cands: list[Candidate], picks: dict[str, LayerOption | None],
                measured: dict[str, list[LayerOption]], ep: str) -> list[Candidate]:
    """Set the picked option on each candidate (ranks, multiplier, measured ratio) or the reason
    it has none; returns the picked ones, worst measured layer ratio first."""
    for c in cands:
        o = picks.get(c.site.name)
        if o is None:
            c.reason = not_picked_reason(measured[c.site.name], ep)
        else:
            c.ranks, c.multiplier, c.stacked, c.measured_ratio = o.ranks, o.multiplier, o.form == "stacked", o.ratios
    return sorted([c for c in cands if not c.reason], key=lambda c: -max(c.measured_ratio.values()))


def not_picked_reason(options: list[LayerOption], ep: str) -> str:
    """Why a layer has no pick: no measured form is faster (with the best one's ratio), or the
    latency budget did not need it."""
    best = min(options, key=lambda m: ratio_of(m.worst).bounds()[1], default=None)
    if best is not None and any(m.faster for m in options):
        return "not needed for the latency budget"
    return f"not measurably faster on {ep}" + (f" (best layer ratio {format_ratio(best.worst)})"
                                               if best is not None else " (no cheaper form)")


def check_whole_model(model: onnx.ModelProto, build: Callable[[list[str]], onnx.ModelProto],
                      worst_first: list[str], probes: dict[int, Probe], bound: tuple[float, ...]) -> WholeModel:
    """The never-slower check of the chosen layers; if the model measured faster, the Gather
    folds that make it faster still, kept only if the folded model too measures faster than the
    original. `bound`: further thresholds each measurement should settle (a latency budget's 1/R)."""
    check = never_slower(model, build, worst_first, probes, also=bound)
    if not check.faster:
        return WholeModel(check, [], set(), {})
    trials, last = choose_folds(lambda folded: FoldGatherPass(folded).call(build(check.kept)).model, probes)
    folded = {t.layer for t in trials if t.folded}
    final = check.steps[-1].ratios
    if folded:  # the returned model is the folded one: it too must measure faster than the original
        ratios = {b: asdict(p.compare(model, last, threshold=(1.0, *bound))) for b, p in probes.items()}
        if all(faster(r, 1.0) for r in ratios.values()):
            final = ratios
        else:
            folded = set()
    return WholeModel(check, trials, folded, final)


def budget_report(budget: BudgetOptions, picks: Picks, whole: WholeModel) -> BudgetReport:
    """The error budget as asked (its achieved error is set by optimize), or the latency budget
    with the measured speed-up, met only if the whole model measures at least R times faster."""
    target = budget.latency_reduction
    if target is None:
        return BudgetReport(mode="error", target=budget.error, achieved=None)
    report = BudgetReport(mode="latency", target=target, achieved=whole.speedup, met=picks.met,
                          message="" if picks.met else "the latency budget cannot be met by layers that are "
                                                       "measurably faster; kept every one that is")
    if whole.final and report.met and not all(faster(r, 1 / target) for r in whole.final.values()):
        report.met = False
        report.message = (f"measured whole-model speed-up {whole.speedup:.2f}x is not measurably "
                          f"{target:g}x or more (layer times do not add up exactly in the model)")
    return report


def outcome_message(chosen: bool, faster_model: bool, ep: str, quantize: str = "off") -> str:
    """'' when a faster model is returned, else why the original is (the INT8 forms compared, with quantize)."""
    if quantize != "off":
        if not chosen:
            return f"no conv is measurably faster in {quantize.upper()} GDWS form than in {quantize.upper()} on {ep}: " \
                   "every conv stays as it is"
        return "" if faster_model else f"no rewrite made the {quantize.upper()} model faster: every conv stays as it is"
    if not chosen:
        return f"no conv is measurably faster in GDWS form on {ep}: the model is unchanged"
    return "" if faster_model else "no rewrite made the whole model faster: the original is returned unchanged"


def _layer_entry(options: list[LayerOption], chosen: LayerOption | None) -> dict:
    """A layer's measured options for the report, and the index of the chosen one (None: none)."""
    return {"options": [{"total_rank": int(o.ranks.sum()), "multiplier": o.multiplier, "form": o.form, "error": o.error,
                         "ratios": o.measured} for o in options],
            "chosen": next((i for i, o in enumerate(options) if o is chosen), None)}


def search_latency_budget(cands: list[Candidate], measured: dict[str, list[LayerOption]], target: float,
                          model: onnx.ModelProto, build: Callable[[dict], onnx.ModelProto], probe: Probe,
                          steps: int = 6) -> Picks:
    """Least-error choice whose *whole model* measures below 1/target of the original (the
    interval of its median ratio below 1/target).

    Layer savings measured in isolation do not add up to the model's (session overheads,
    fused neighbours), so the saving asked of the layer table is bisected against
    whole-model measurements. Not reachable: every measurably faster layer, `met` False."""
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
        return Picks({n: o for n, o in zip(names, chosen) if o is not None}, False, baseline_ms, log)
    return Picks(best, True, baseline_ms, log)


def _site_in(model: onnx.ModelProto, site: ConvSite) -> ConvSite:
    """The same conv site bound to another copy of the model (same node index)."""
    return ConvSite(**{**site.__dict__, "node": model.graph.node[site.index]})
