"""`profile`: time every eligible conv's candidate realizations on this machine (the target
device) and return them as a `LatencyTable` for `optimize --target latency --latency-table` on
another (the host): the forms conv="auto" chooses among (every family's, or one family's, on the
error ladder of the budget), or with conv="gdws" the GDWS planner's ladder. Needs ONNX, ONNX
Runtime and numpy only: no torch, no scipy."""

from __future__ import annotations

from dataclasses import dataclass, field

from gdws_onnx.errors import OptionError, literal
from gdws_onnx.graph.model_io import LoadedModel, file_sha256
from gdws_onnx.pipeline import auto, latency, measure
from gdws_onnx.pipeline.candidates import Candidate, skip_reasons
from gdws_onnx.pipeline.families import families
from gdws_onnx.pipeline.latency_table import LatencyTable, LayerMeasurement
from gdws_onnx.pipeline.optimize import analyze, select
from gdws_onnx.pipeline.options import (
    BudgetOptions,
    CalibrationOptions,
    RunOptions,
    SelectionOptions,
    TimingOptions,
)


@dataclass
class ProfileOptions:
    """What `profile` measures: where (timing: ep, batches, rounds; run: threads, input shapes),
    which convs (selection, as optimize chooses them) and whose forms (`selection.conv`: "auto",
    the default, every family's forms on the ladder of `budget.error_budget`, else
    DEFAULT_AUTO_ERROR_BUDGET, as conv="auto" builds them; "ssvd" those of spatial SVD alone;
    "gdws" the GDWS planner's latency-budget ladder and its error budget's realizations at
    `budget.error` with `budget.alphas`)."""

    timing: TimingOptions = field(default_factory=TimingOptions)
    run: RunOptions = field(default_factory=RunOptions)
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    budget: BudgetOptions = field(default_factory=lambda: BudgetOptions(target="latency"))

    def validate(self) -> None:
        """OptionError on a conv rewrite profile cannot measure, or alphas outside conv="gdws"."""
        self.timing.validate()
        self.budget.validate()
        conv = self.selection.conv or "auto"
        if conv not in ("auto", "gdws", "ssvd"):
            raise OptionError(f"{{0}} must be auto, gdws or ssvd to profile, got {literal(conv)}", "conv")
        if conv != "gdws" and self.budget.alphas is not None:
            raise OptionError("{0} weight the GDWS planner's forms: profile them with {1}", "alphas", "conv=gdws")


def profile(loaded: LoadedModel, opts: ProfileOptions) -> LatencyTable:
    """Measure each eligible conv's realizations against the original conv at every batch (as
    `--target latency` does, each until its interval decides FASTER or the limits are reached),
    and the whole original model's time per batch; nothing is cached on disk."""
    opts.validate()
    conv = opts.selection.conv or "auto"
    analysis = analyze(loaded, opts.run, opts.budget)
    timing, run = opts.timing, opts.run
    env = measure.environment_key(timing.ep, run.threads)
    probes = measure.layer_probes(timing, run, "layer")
    model_probes = measure.layer_probes(timing, run, "model")
    timers = latency.Timers(probes, model_probes, env, measure.LatencyCache(None))
    if conv == "gdws":
        cands = select(loaded.model, analysis, opts.selection, CalibrationOptions(), opts.run).cands
        latency.require_input_shapes([c.site for c in cands])
        layers = {c.site.name: _measure(c, opts.budget.error, probes, timers.cache, env) for c in cands}
        fams, eps = {}, None
    else:
        fams = families(None if conv == "auto" else (conv,))
        eps = opts.budget.auto_error
        reasons = skip_reasons(analysis.sites, opts.selection)
        sites = [s for s in analysis.sites if not reasons[s.name]]
        latency.require_input_shapes(sites)
        layers = {name: _auto_measurements(c, env) for name, c in
                  auto.measure_choices(sites, fams, auto.ladder(eps), run, timers, None, timing).items()}
    model_ms = {b: p.compare(loaded.model, loaded.model).baseline_ms for b, p in model_probes.items()}
    return LatencyTable(environment=_environment(timing, run), key_environment=env,
                        model={"name": loaded.path, "sha256": file_sha256(loaded.path) if loaded.path else None,
                               "input_shapes": run.input_shapes},
                        batches=list(timing.batches), model_ms=model_ms, layers=layers,
                        conv="gdws" if conv == "gdws" else "auto", families=list(fams), error_budget=eps)


def _auto_measurements(c: auto.Choice, env: dict) -> list[LayerMeasurement]:
    """A conv's timed forms as table rows, under the auto planner's cache keys."""
    return [LayerMeasurement(auto.cache_key(c.site, m.form, b, env), m.form.rank, False, b, r, family=m.form.family,
                             form=m.form.realization, ranks=list(m.form.ranks) or None, error=m.form.error)
            for m in c.measured for b, r in m.ratios.items()]


def choices(c: Candidate, eps: float) -> list:
    """The realizations measured for a candidate: the latency ladder, then the error budget's
    forms, each (total rank, form) once."""
    out, seen = [], set()
    for ranks, form in latency.layer_choices(c, None) + latency.layer_choices(c, eps):
        if form != "stacked" and (int(ranks.sum()), form) not in seen:  # tables hold the two older forms
            seen.add((int(ranks.sum()), form))
            out.append((ranks, form))
    return out


def _measure(c: Candidate, eps: float, probes: dict, cache: measure.LatencyCache, env: dict
             ) -> list[LayerMeasurement]:
    options = latency.measure_layer(c.site, c.spec, c.alpha, choices(c, eps), probes, cache, env)
    return [LayerMeasurement(measure.LatencyCache.key(c.site, (int(o.ranks.sum()), o.form), b, env),
                             int(o.ranks.sum()), o.multiplier, b, r)
            for o in options for b, r in o.measured.items()]


def _environment(timing: TimingOptions, run: RunOptions) -> dict:
    """The full environment of the measurements, with the package the EP came from."""
    from gdws_onnx.runtime.bench import BenchConfig, environment
    from gdws_onnx.runtime.providers import provider_source

    env = environment(BenchConfig(ep=timing.ep, threads=run.threads))
    return {**env, "ep_package": provider_source(timing.ep), "batches": list(timing.batches),
            "runs": timing.runs, "max_rounds": timing.max_rounds, "measure_seconds": timing.measure_seconds}
