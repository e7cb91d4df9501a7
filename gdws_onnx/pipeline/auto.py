"""`conv="auto"`: every eligible conv in the fastest measurably faster form of any factorization
family (`families.FAMILIES`), under one network-wide accuracy budget; never a slower model.

    forms    each family's forms at a ladder of relative weight errors (LEVELS x the budget, up to it)
    prune    drop forms with no MAC cut, and forms another form beats by PRUNE_MACS in MACs at no
             more error: only what can win is timed
    time     each form alone against the dense layer on the target EP, interleaved, cached
             (`measure`: kept only if the whole interval of the median ratio is below FASTER)
    allocate one knapsack over all layers: most measured saving with every layer's relative weight
             error <= the budget, among forms that pay for their error (layer ratio <= 1 - payoff x
             error: `Measured.pays`) (`allocate.most_saving_within`; with every layer capped at
             the budget it picks each layer's fastest such form)
    check    the whole model against the original, reverting the worst layers until measurably
             faster (`measure.never_slower`)

The accuracy currency is relative weight error ||W - W'||^2 / ||W||^2, which every family
shares, and the budget caps it per layer. A network-wide *mean* (layers that buy much speed
taking more than eps) was measured and rejected as the default: at mean 0.15 the VGG-16 kept
its accuracy, but the narrow ResNet-18 put 0.35-0.45 on the few layers that were faster and
lost 45 points of PGD-20 accuracy (docs/auto.md).

The pay-off rule prices that error in the layer's own measured speed: a form at error e is used
only if it runs at most 1 - payoff x e of the dense layer's time (default 4: at 0.15, 0.4). Wide
layers with room pass it easily (the VGG-16's forms run at 0.1-0.44); layers whose forms buy little
(the narrow zoo models': 0.65-0.95 at 0.1-0.15) stay dense instead of losing robust accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx

from gdws_onnx.core import allocate
from gdws_onnx.errors import OptionError, literal
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.graph.rewrite import layer_model, replace_convs
from gdws_onnx.pipeline.families import Family, Form, dense_macs
from gdws_onnx.pipeline.latency import Timers, require_input_shapes, table_message
from gdws_onnx.pipeline.latency_table import LatencyTable
from gdws_onnx.pipeline.measure import (
    CONFIDENCE,
    FASTER,
    LatencyCache,
    conclusive,
    faster,
    never_slower,
)
from gdws_onnx.pipeline.options import (
    BudgetOptions,
    RunOptions,
    TimingOptions,
)
from gdws_onnx.pipeline.report import BudgetReport, LatencyReport
from gdws_onnx.runtime.bench import format_ratio, ratio_of

LEVELS = (0.25, 0.5, 0.75, 1.0)  # per-layer errors tried, as multiples of the budget
MAX_LAYER_ERROR = 0.5  # no layer's relative weight error goes past this, whatever the budget
PRUNE_MACS = 2.0  # a form is not timed if another has no more error and PRUNE_MACS x fewer MACs
KNAPSACK_STEPS = 1000  # error steps of the knapsack over all layers (rounded up to a multiple of the layers)


@dataclass
class Measured:
    """One timed form of one layer: batch -> bench.Ratio dict (form / dense layer latency)."""

    form: Form
    ratios: dict[int, dict]

    @property
    def faster(self) -> bool:
        """Measurably below FASTER x the dense layer at every batch."""
        return all(faster(r, FASTER) for r in self.ratios.values())

    def pays(self, payoff: float) -> bool:
        """Worth its error: at every batch the upper bound of the layer ratio is at most
        1 - payoff x error (payoff 0: any form)."""
        return all(ratio_of(r).bounds()[1] <= 1 - payoff * self.form.error for r in self.ratios.values())

    @property
    def worst(self) -> dict:
        return max(self.ratios.values(), key=lambda r: r["median"])

    @property
    def saving_ms(self) -> float:
        """Dense minus form latency at the first batch (what the knapsack maximizes)."""
        r = self.ratios[next(iter(self.ratios))]
        return r["baseline_ms"] - r["candidate_ms"]

    def to_dict(self) -> dict:
        return {"family": self.form.family, "total_rank": self.form.rank, "form": self.form.realization,
                "error": self.form.error, "macs": self.form.macs, "ratios": self.ratios}


@dataclass
class Choice:
    """What the planner decided for one eligible conv."""

    site: ConvSite
    measured: list[Measured] = field(default_factory=list)
    picked: Measured | None = None
    reason: str = ""  # why it stays dense ('' when picked)
    skipped: dict[str, str] = field(default_factory=dict)  # family -> why it cannot realize the conv


@dataclass
class AutoPlan:
    """The chosen form per conv (name -> Choice), the budget report and what was measured."""

    choices: dict[str, Choice]
    budget: BudgetReport
    latency: LatencyReport


def ladder(eps: float) -> list[float]:
    """The per-layer relative errors at which each family's forms are built: LEVELS x eps, capped."""
    return sorted({min(level * eps, MAX_LAYER_ERROR) for level in LEVELS})


def prune(forms: list[Form], dense: int) -> list[Form]:
    """Only forms that can win: fewer MACs than the dense conv, and no other form with at most
    its error and PRUNE_MACS times fewer MACs."""
    cheaper = [f for f in forms if f.macs < dense]
    return [f for f in cheaper
            if not any(g.error <= f.error and g.macs * PRUNE_MACS <= f.macs for g in cheaper if g is not f)]


def candidate_forms(site: ConvSite, fams: dict[str, Family], errors: list[float], choice: Choice) -> list[Form]:
    """Every family's forms of one conv at `errors`, pruned; records the families that cannot realize it."""
    forms = []
    for name, fam in fams.items():
        why = fam.skip_reason(site)
        if why:
            choice.skipped[name] = why
        else:
            forms += fam.forms(site, errors)
    return prune(forms, dense_macs(site))


def form_model(site: ConvSite, batch: int, fam: Family, form: Form) -> onnx.ModelProto:
    """The conv alone at its input shape (`layer_model`), replaced by the family's realization of `form`."""
    model = layer_model(site, batch)
    local = ConvSite(**{**site.__dict__, "index": 0, "node": model.graph.node[0], "weight_producers": set()})
    return replace_convs(model, [local], lambda s, names: fam.subgraph(s, form, names))


def cache_key(site: ConvSite, form: Form, batch: int, env: dict) -> str:
    """The layer cache's key of a form: GDWS forms keep their historical keys; others add the family."""
    if form.family == "gdws":
        return LatencyCache.key(site, (form.rank, form.realization), batch, env)
    ranks = "x".join(map(str, form.ranks)) if form.family == "tucker" else str(form.rank)
    return LatencyCache.key(site, (form.rank, f"{form.family}:{form.realization}:{ranks}"), batch, env)


def time_forms(site: ConvSite, forms: list[Form], fams: dict[str, Family], timers: Timers) -> list[Measured]:
    """Each form against the dense layer at every batch, until its interval decides FASTER (or the
    probe's limits); conclusive cached measurements are reused."""
    out = []
    originals = {b: layer_model(site, b) for b in timers.layer}
    for form in forms:
        ratios = {}
        for batch, probe in timers.layer.items():
            key = cache_key(site, form, batch, timers.env)
            hit = timers.cache.get(key, usable=conclusive)
            if hit is None:
                candidate = form_model(site, batch, fams[form.family], form)
                hit = asdict(probe.compare(originals[batch], candidate, threshold=FASTER))
                timers.cache.put(key, hit)
            ratios[batch] = asdict(ratio_of(hit))
        out.append(Measured(form, ratios))
    return out


def allocate_forms(choices: list[Choice], eps: float, payoff: float = 0.0) -> None:
    """Pick each layer's form: most total measured saving with sum of errors <= eps x the number
    of eligible convs, among forms measurably faster that pay for their error (`Measured.pays`;
    each within the ladder, so within its cap); sets `picked` or `reason`."""
    usable = [[m for m in c.measured if m.faster and m.pays(payoff)] for c in choices]
    table = [[(0.0, 0.0)] + [(m.saving_ms, m.form.error) for m in opts] for opts in usable]
    # error steps of eps / K: a form at the cap takes exactly K steps, so rounding never shuts it out
    steps_per_layer = max(1, -(-KNAPSACK_STEPS // max(len(choices), 1)))
    picks = allocate.most_saving_within(table, eps * len(choices), bins=steps_per_layer * len(choices))
    for c, opts, j in zip(choices, usable, picks):
        c.picked = opts[j - 1] if j else None
        if c.picked is None:
            c.reason = not_picked_reason(c, payoff)


def not_picked_reason(c: Choice, payoff: float = 0.0) -> str:
    """Why a layer stays dense: no family realizes it with fewer MACs, none of its forms is
    measurably faster (with the best ratio), none of those pays for its error, or the budget was
    worth more elsewhere."""
    if not c.measured:
        why = "; ".join(f"{k}: {v}" for k, v in c.skipped.items())
        return "no family has a form with fewer MACs within the error ladder" + (f" ({why})" if why else "")
    fast = [m for m in c.measured if m.faster]
    if fast and not any(m.pays(payoff) for m in fast):
        best = min(fast, key=lambda m: ratio_of(m.worst).bounds()[1] - (1 - payoff * m.form.error))
        return (f"no faster form pays for its error (best: {best.form.family} at error {best.form.error:.3f}, layer "
                f"ratio {format_ratio(best.worst)}; the pay-off rule asks <= {1 - payoff * best.form.error:.2f})")
    if fast:
        return "its measurably faster forms cost more accuracy budget than they save time"
    best = min(c.measured, key=lambda m: ratio_of(m.worst).bounds()[1])
    return (f"no form measurably faster (best: {best.form.family} rank {best.form.rank}, layer ratio "
            f"{format_ratio(best.worst)})")


def plan_auto(model: onnx.ModelProto, sites: list[ConvSite], fams: dict[str, Family], budget: BudgetOptions,
              timing: TimingOptions, run: RunOptions, quantize: str = "off") -> AutoPlan:
    """Choose every eligible conv's family, rank and realization by measured latency under the
    network-wide error budget, then check the whole model (never slower). `model` is the
    unmodified original; `sites` the eligible convs. With quantize "int8" every comparison is
    between INT8 forms (layer against the INT8 layer, model against INT8 alone). With
    `timing.latency_table` every layer ratio is read from the table `profile --conv auto` wrote
    on the device and nothing is timed here: the whole-model check is left to the device, and
    the report says so (OptionError when the table lacks a family, a batch, the budget's ladder
    or a conv)."""
    eps = budget.auto_error
    require_input_shapes(sites)
    table = None
    if timing.latency_table is not None:
        table = LatencyTable.load(timing.latency_table)
        table.require("auto", list(fams), eps, timing.batches, timing.latency_table)
    timers = None if table is not None else Timers.create(timing, run, model, quantize)
    choices = measure_choices(sites, fams, ladder(eps), run, timers, table, timing)
    allocate_forms(list(choices.values()), eps, budget.auto_payoff)
    picked = sorted([c for c in choices.values() if c.picked],
                    key=lambda c: -ratio_of(c.picked.worst).bounds()[1])  # worst layer ratio first
    if table is not None:  # the whole-model check needs the device: the message says how to run it there
        check, env = None, table.key_environment
        message = table_message(table, timing.latency_table, timing.batches)
        if not picked:
            message = f"{outcome(picked, list(choices.values()), False, env.get('ep'), quantize)}; {message}"
        hits = sum(len(m.ratios) for c in choices.values() for m in c.measured)
        cache = {"path": timing.latency_table, "hits": hits, "misses": 0, "table": True}
    else:
        check, env = check_whole_model(model, picked, choices, fams, timers, run), timers.env
        message = outcome(picked, list(choices.values()), check.faster, timing.ep, quantize)
        cache = {"path": timers.cache.path, "hits": timers.cache.hits, "misses": timers.cache.misses}
    final = check.steps[-1].ratios if check is not None and check.faster else {}
    speedup = 1 / max(r["median"] for r in final.values()) if final else None
    report = LatencyReport(
        ep=env.get("ep", timing.ep), batches=timing.batches, threads=env.get("threads") or run.threads,
        environment=env, cache=cache, model_baseline_ms=None, budget_search=[],
        faster=check is not None and check.faster, final_ratios=final, speedup=speedup,
        layer_threshold=FASTER, confidence=CONFIDENCE,
        layers={n: {"options": [m.to_dict() for m in c.measured],
                    "chosen": next((i for i, m in enumerate(c.measured) if m is c.picked), None),
                    "families_skipped": c.skipped} for n, c in choices.items()},
        checks=check.steps if check is not None else [], fold_trials=[], folded=[], message=message)
    return AutoPlan(choices, budget_report(choices, eps, budget.auto_payoff), report)


def check_whole_model(model: onnx.ModelProto, picked: list[Choice], choices: dict[str, Choice],
                      fams: dict[str, Family], timers: Timers, run: RunOptions):
    """The whole model with the picked forms against the original (`measure.never_slower`,
    worst layer first); a layer it reverts loses its pick and says why."""
    if run.progress is not None:
        run.progress("whole-model check (never slower)")
    check = never_slower(model, lambda names: realize(model, {n: choices[n] for n in names}, fams),
                         [c.site.name for c in picked], timers.model)
    for c in picked:
        if c.site.name not in check.kept:
            c.picked, c.reason = None, "reverted: the whole model was not faster with it"
    timers.cache.save()
    return check


def measure_choices(sites: list[ConvSite], fams: dict[str, Family], errors: list[float], run: RunOptions,
                    timers: Timers | None, table: LatencyTable | None, timing: TimingOptions) -> dict[str, Choice]:
    """Each conv's pruned forms at `errors`, timed by `timers` or read from `table` (OptionError
    naming the convs the table has no measurement of)."""
    choices, unmatched = {}, []
    for i, site in enumerate(sites, 1):
        c = Choice(site)
        forms = candidate_forms(site, fams, errors, c)
        if table is not None:
            measured = table_times(site, forms, table, timing.batches)
            if measured is None:
                unmatched.append(site.name)
            c.measured = measured or []
        else:
            if run.progress is not None:
                run.progress(f"timing conv {i}/{len(sites)} {site.name}: {len(forms)} forms")
            c.measured = time_forms(site, forms, fams, timers)
        choices[site.name] = c
    if unmatched:
        raise OptionError(f"{{0}} has no measurement of some forms of {literal(unmatched[:3])}: it was profiled for "
                          f"model {literal(table.model.get('name'))} (another model, other input shapes, or other "
                          "{1}/{2}/{3}?)", "latency_table", "skip_first", "include", "exclude")
    if timers is not None:
        timers.cache.save()
    return choices


def table_times(site: ConvSite, forms: list[Form], table: LatencyTable, batches: list[int]) -> list[Measured] | None:
    """Each form's layer ratios from a profiled table, looked up by `cache_key` under the table's
    own environment (so a table from another machine or file name works); None when the table
    lacks one. A measurement that did not decide FASTER counts as not faster: the device is not
    here to measure it again."""
    entries, out = table.entries, []
    for form in forms:
        keys = {b: cache_key(site, form, b, table.key_environment) for b in batches}
        if not all(k in entries for k in keys.values()):
            return None
        out.append(Measured(form, {b: asdict(ratio_of(entries[k])) for b, k in keys.items()}))
    return out


def budget_report(choices: dict[str, Choice], eps: float, payoff: float) -> BudgetReport:
    """The error budget as spent: its cap, the pay-off rule, the largest and mean error."""
    errors_used = [c.picked.form.error for c in choices.values() if c.picked]
    mean = sum(errors_used) / len(choices) if choices else 0.0
    return BudgetReport(
        mode="error", target=eps, achieved=max(errors_used, default=0.0),
        message=f"budget: per-layer relative weight error ||W - W'||^2 / ||W||^2 <= {min(max(LEVELS) * eps, MAX_LAYER_ERROR):g} "
                f"in every family, spent only where it pays (layer ratio <= 1 - {payoff:g} x error) "
                f"(largest {max(errors_used, default=0.0):.4f}, mean over the {len(choices)} eligible convs {mean:.4f})")


def realize(model: onnx.ModelProto, chosen: dict[str, Choice], fams: dict[str, Family]) -> onnx.ModelProto:
    """A copy of `model` with each chosen conv replaced by its picked form (one splice for all families)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    apply_choices(m, chosen, fams)
    return m


def apply_choices(model: onnx.ModelProto, chosen: dict[str, Choice], fams: dict[str, Family]) -> None:
    """Replace, in place, each conv of `chosen` that has a pick by its family's realization."""
    picks = {c.site.index: c for c in chosen.values() if c.picked is not None}
    sites = [ConvSite(**{**c.site.__dict__, "node": model.graph.node[i]}) for i, c in picks.items()]

    def build(site, names):
        c = picks[site.index]
        return fams[c.picked.form.family].subgraph(site, c.picked.form, names)

    replace_convs(model, sites, build)


def outcome(picked: list[Choice], choices: list[Choice], faster_model: bool, ep: str, quantize: str) -> str:
    """'' when a faster model is returned, else why the original is."""
    kind = f"{quantize.upper()} " if quantize != "off" else ""
    if not picked:
        fast = sum(any(m.faster for m in c.measured) for c in choices)
        if fast:
            return (f"{fast} conv(s) measurably faster in a factorized {kind}form on {ep}, but none by enough to pay for "
                    "its error (the pay-off rule; see each layer's status): every conv stays as it is")
        return f"no conv is measurably faster in any factorized {kind}form on {ep}: every conv stays as it is"
    return "" if faster_model else f"no rewrite made the {kind}model faster: every conv stays as it is"
