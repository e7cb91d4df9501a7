"""`optimize`: a short sequence of named steps, each doing one thing:

    analyze -> select -> plan (a budget planner, `budgets.planner_for`) -> settle -> decompose
    -> rewrite -> calibrate (bias correction) -> fold -> fc -> report -> finetune (recovery, when asked)
    -> quantize (INT8) -> verify

Each step receives the option groups it needs (`options.py`), not the whole options.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from gdws_onnx.core import decompose
from gdws_onnx.core.blas import blas_threads
from gdws_onnx.errors import GDWSError, OptionError, OptionText, literal
from gdws_onnx.graph.convs import ConvSite, find_convs, node_label
from gdws_onnx.graph.fold import FoldGatherPass
from gdws_onnx.graph.model_io import LoadedModel, load_model
from gdws_onnx.graph.pattern import layer_of
from gdws_onnx.graph.rewrite import GDWSRewritePass, LayerRewrite
from gdws_onnx.peers.common import mac_shortfall
from gdws_onnx.pipeline.budgets import planner_for
from gdws_onnx.pipeline.candidates import BudgetPlan, Candidate, name_filter, skip_reasons
from gdws_onnx.pipeline.inputs import data_arrays, named_inputs
from gdws_onnx.pipeline.int8 import quantize, require_quantizable
from gdws_onnx.pipeline.options import (
    BudgetOptions,
    CalibrationOptions,
    OptimizeOptions,
    RunOptions,
    SelectionOptions,
    VerifyOptions,
)
from gdws_onnx.pipeline.report import FCSummary, LayerReport, OptimizeReport, VerificationReport
from gdws_onnx.pipeline.spatial import rewrite_spatial_svd
from gdws_onnx.provenance import versions
from gdws_onnx.runtime.session import (
    data_feeds,
    input_insensitive_outputs,
    make_session,
    probe_shapes,
    random_feeds,
    run_and_compare,
)

if TYPE_CHECKING:
    from gdws_onnx.calibrate.bias_correction import BiasCorrectionReport

VERIFY_SAMPLES = 256  # samples of a data set spec used for verification
CALIBRATION_SAMPLES = 1000  # samples of a data set spec used by bias correction and data-aware truncation
QUANTIZED_VERIFICATION = ("the optimized model is INT8: these errors include the quantization error, on inputs that "
                          "include the calibration samples")


def load_alphas(source: str | dict | None) -> dict[str, np.ndarray]:
    """Per-layer alpha vectors keyed by conv name, from a dict, a .json or an .npz file."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return {k: np.asarray(v, dtype=np.float64) for k, v in source.items()}
    if not os.path.isfile(source):
        raise OptionError(f"{{0}} file not found: {literal(source)}", "alphas")
    try:
        if source.endswith(".npz"):
            with np.load(source) as z:
                return {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
        with open(source) as f:
            return {k: np.asarray(v, dtype=np.float64) for k, v in json.load(f).items()}
    except (ValueError, OSError) as e:
        raise OptionError(f"cannot read {{0}} {literal(source)}: {literal(e)}", "alphas") from None


def _alpha_for(site: ConvSite, alphas: dict[str, np.ndarray]) -> np.ndarray:
    a = alphas.get(site.name, np.ones(1))
    if a.size not in (1, site.in_channels) or np.any(a < 0) or not np.all(np.isfinite(a)):
        raise GDWSError(f"alphas for '{site.name}' must be 1 or {site.in_channels} non-negative "
                        f"finite values, got {a.size}")
    return np.broadcast_to(a.ravel(), (site.in_channels,)).astype(np.float64)


def predicted_mismatch(cands: list, alphas: dict[str, np.ndarray]) -> float | None:
    """sum over rewritten candidates of sum_c alpha_c e_c (the first-order bound on the top-1
    mismatch when alphas are noise gains); None unless every rewritten conv has alphas."""
    done = [c for c in cands if c.ranks is not None and not c.reason]
    if not alphas or any(c.site.name not in alphas for c in done):
        return None
    return float(sum(decompose.weighted_error(c.spec, c.ranks, c.alpha) for c in done))


def _layer_report(site: ConvSite, reason: str, cand: Candidate | None,
                  factors: decompose.GDWSFactors | None) -> LayerReport:
    w = site.weight
    rep = LayerReport(name=site.name, kernel=list(site.kernel_shape) if w is not None else [],
                      in_channels=site.in_channels if w is not None else 0,
                      out_channels=site.out_channels if w is not None else 0,
                      groups=site.group, status="skipped", reason=reason, weight_source=site.weight_source,
                      pixels=site.pixels)
    if w is None:
        return rep
    rep.macs_per_pixel_before = rep.macs_per_pixel_after = site.macs_per_pixel
    rep.params_before = rep.params_after = site.params
    if cand is not None and factors is not None:
        spec, ranks = cand.spec, cand.ranks
        rep.status, rep.family = "rewritten", "gdws"
        identity = np.array_equal(factors.gather, np.arange(site.in_channels))
        rep.realization = ("stacked dw+concat+pw" if factors.stacked else "multiplier dw+pw" if factors.multiplier else
                           "dw+pw" if identity else "gather+dw+pw")
        rep.measured_ratio = cand.measured_ratio
        rep.max_rank, rep.total_rank = spec.max_rank, int(ranks.sum())
        rep.macs_per_pixel_after = (decompose.multiplier_cost_per_pixel(spec, ranks) if factors.multiplier
                                    else decompose.gdws_cost_per_pixel(spec, ranks))
        rep.params_after = rep.macs_per_pixel_after + (site.params - int(w.size))
        energy = decompose.weighted_energy(spec, cand.alpha)
        rep.relative_error = decompose.weighted_error(spec, ranks, cand.alpha) / energy if energy > 0 else 0.0
    return rep


def _account_folds(layers: list[LayerReport], model: onnx.ModelProto, folded: dict[str, str]) -> None:
    """A folded Gather makes its producer emit G channels instead of C: move (G - C) output
    channels' MACs and weights onto the producer's layer, and name the realization."""
    by_name = {r.name: r for r in layers}
    nodes = {node_label(n): n for n in model.graph.node if n.op_type == "Conv"}
    inits = {t.name: t for t in model.graph.initializer}
    for layer, producer in folded.items():
        rep, node = by_name[layer], nodes[producer]
        rep.realization = f"dw+pw, Gather folded into {producer}"
        weight = inits[node.input[1]]
        width = int(weight.dims[0])  # the producer now emits the gathered channels
        per_channel = int(np.prod(weight.dims[1:]))
        bias = 1 if len(node.input) > 2 and node.input[2] else 0
        owner = by_name.get(layer_of(producer))
        if owner is not None and owner.macs_per_pixel_after is not None:
            owner.macs_per_pixel_after += (width - rep.in_channels) * per_channel
            owner.params_after += (width - rep.in_channels) * (per_channel + bias)


def verify(original: onnx.ModelProto | str, optimized: onnx.ModelProto, verification: VerifyOptions,
           run: RunOptions) -> VerificationReport:
    """Run both models in ONNX Runtime on the same inputs (`run.data`, else random inputs) and
    compare every output; flag the outputs that do not depend on the input (the original on a
    second, different input gives the same values), and call the verification vacuous when that
    holds for all of them. Inputs whose shape is not known skip it, with the reason."""
    ref = make_session(original)
    new = make_session(optimized)
    if run.data:
        arrays, desc = data_arrays(run.data, VERIFY_SAMPLES)
        feeds = data_feeds(ref, arrays)
    else:
        try:
            feeds = random_feeds(ref, run.input_shapes, seed=run.seed)
        except GDWSError as e:
            return VerificationReport(ran=False, message=str(e), error=e if isinstance(e, OptionError) else None)
        desc = "random inputs in [0,1) (seed {}, shapes {})".format(
            run.seed, ", ".join(f"{k}:{','.join(map(str, v.shape))}" for k, v in feeds.items()))
    names = [o.name for o in ref.get_outputs()]
    reference = dict(zip(names, ref.run(names, feeds)))
    outputs = run_and_compare(ref, new, feeds, reference)
    gate = verification.max_error
    passed = gate is None or all(o.relative <= gate for o in outputs)
    constant = input_insensitive_outputs(ref, feeds, reference, seed=run.seed + 1) or []
    return VerificationReport(ran=True, inputs=desc, outputs=outputs, max_error=gate, passed=passed,
                              constant_outputs=constant, vacuous=bool(outputs) and len(constant) == len(outputs))


def spectra(model: onnx.ModelProto, sites: list[ConvSite], calibration: CalibrationOptions,
            run: RunOptions) -> list[decompose.Spectrum]:
    """Each site's per-channel spectrum: weight-space SVD, or with data_aware the SVD in the
    metric blended from the channel's input second moments on the calibration data."""
    if calibration.data_aware is None or not sites:
        return [decompose.spectrum(s.weight, s.group) for s in sites]
    from gdws_onnx.calibrate.data_aware import blended_metric, channel_second_moments  # loads the attack code: only when asked

    arrays, _ = data_arrays(run.data, CALIBRATION_SAMPLES)
    second = channel_second_moments(model, named_inputs(model, arrays), sites, threads=run.threads)
    return [decompose.metric_spectrum(s.weight, s.group, blended_metric(second[s.name], calibration.data_aware))
            for s in sites]


class Stopwatch:
    """Wall time of named steps: `with clock("rewrite"): ...` sets timings["rewrite"]; `progress`,
    when given, is told each step as it starts."""

    def __init__(self, progress: Callable[[str], None] | None = None):
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        if self.progress is not None:
            self.progress(step)
        t0 = time.perf_counter()
        yield
        self.timings[step] = time.perf_counter() - t0


@dataclass
class Analysis:
    """The model's convs and the per-channel error weights given for them."""

    sites: list[ConvSite]
    alphas: dict[str, np.ndarray]


@dataclass
class Selection:
    """The candidates with their spectra, and why each other conv is left alone (conv -> reason, '' for candidates)."""

    cands: list[Candidate]
    reasons: dict[str, str]


def optimize_loaded(loaded: LoadedModel, opts: OptimizeOptions) -> tuple[onnx.ModelProto, OptimizeReport]:
    """The pipeline on a loaded model; the model object is rewritten in place. numpy's BLAS runs
    on `opts.run.threads` threads (default: `blas.default_blas_threads()`)."""
    opts.validate()
    with blas_threads(opts.run.threads):
        return _optimize_loaded(loaded, opts)


def _optimize_loaded(loaded: LoadedModel, opts: OptimizeOptions) -> tuple[onnx.ModelProto, OptimizeReport]:
    clock, model = Stopwatch(opts.run.progress), loaded.model
    with clock("analyze"):
        analysis = analyze(loaded, opts.run, opts.budget)
    quantizing = opts.calibration.quantize != "off"
    if quantizing:  # before any work: the quantizer's own refusals (inputs, opset)
        require_quantizable(model)
    if not analysis.sites and opts.selection.fc == "off" and not quantizing:  # nothing to do: not an error
        return model, unchanged_report(opts, NO_CONV, clock.timings)
    with clock("keep_original"):
        keep = opts.verification.verify or opts.calibration.finetune is not None
        original = keep_original(loaded) if keep else None
    if analysis.sites and opts.selection.conv in ("auto", "ssvd") and opts.budget.target == "latency":
        with clock("plan"):
            report, convs_changed = rewrite_auto(model, analysis, opts)
    elif opts.selection.conv == "ssvd" and analysis.sites:
        with clock("rewrite"):
            budget, ssvd = rewrite_spatial_svd(model, opts)
        report = OptimizeReport(layers=[], budget=budget, verification=VerificationReport(ran=False),
                                options=opts.to_dict(), versions=versions(), spatial_svd=ssvd)
        convs_changed = any(layer["status"] == "rewritten" for layer in ssvd["layers"])
    else:
        report, convs_changed = rewrite_gdws(model, analysis, opts, clock)
    with clock("fc"):
        fc = rewrite_fc_layers(model, loaded.base_dir, opts)
    report.fc = fc
    if opts.calibration.finetune is not None:
        with clock("finetune"):
            if convs_changed or (fc is not None and fc.layers):
                model, report.finetune = finetune_step(model, original, opts)
            else:
                report.finetune = {"accepted": False, "reason": "nothing was rewritten: nothing to fine-tune"}
    if quantizing:
        with clock("quantize"):
            timing = opts.timing if opts.calibration.mixed_precision else None
            model, report.quantize = quantize(model, opts.run, timing)
    with clock("verify"):
        changed = convs_changed or bool(fc is not None and fc.layers) or quantizing
        idle = None if changed else ("no conv was rewritten" if fc is None else "no conv or FC layer was rewritten")
        report.verification = verification(original, model, idle, opts.verification, opts.run)
        if quantizing and report.verification.ran:
            report.verification.message = QUANTIZED_VERIFICATION
    report.timings = clock.timings
    return model, report


def rewrite_gdws(model: onnx.ModelProto, analysis: Analysis, opts: OptimizeOptions, clock: Stopwatch
                 ) -> tuple[OptimizeReport, bool]:
    """The GDWS rewrite in place: candidates, the budget's plan, the rewrite, bias correction,
    Gather folds; returns the report (verification not run yet) and whether a conv changed."""
    with clock("decompose"):
        selection = select(model, analysis, opts.selection, opts.calibration, opts.run)
        plan = plan_convs(selection, analysis, model, opts)
        chosen = settle(selection, opts.budget)
        rewrites = decompose_chosen(chosen)
    with clock("rewrite"):
        rewrite(model, rewrites)
    correction = None
    if opts.calibration.bias_correction and rewrites:
        with clock("bias_correction"):
            correction = calibrate(model, rewrites, opts.run)
    folded = fold(model, chosen)
    report = build_report(model, analysis, selection, rewrites, folded, plan, opts)
    report.bias_correction = None if correction is None else correction.to_dict()
    return report, bool(rewrites)


def rewrite_auto(model: onnx.ModelProto, analysis: Analysis, opts: OptimizeOptions) -> tuple[OptimizeReport, bool]:
    """conv="auto" (every family) or conv="ssvd" under target="latency" (spatial SVD alone): each
    eligible conv in its fastest measurably faster form within the network-wide error budget
    (`auto.plan_auto`), in place; returns the report (verification not run yet) and whether a conv changed."""
    from gdws_onnx.pipeline.auto import apply_choices, plan_auto
    from gdws_onnx.pipeline.families import families

    fams = families(None if opts.selection.conv == "auto" else (opts.selection.conv,))
    reasons = skip_reasons(analysis.sites, opts.selection)
    eligible = [s for s in analysis.sites if not reasons[s.name]]
    plan = plan_auto(model, eligible, fams, opts.budget, opts.timing, opts.run, quantize=opts.calibration.quantize)
    apply_choices(model, plan.choices, fams)
    layers = [auto_layer_report(s, reasons[s.name], plan.choices.get(s.name), fams) for s in analysis.sites]
    report = OptimizeReport(layers=layers, budget=plan.budget, verification=VerificationReport(ran=False),
                            options=opts.to_dict(), versions=versions(), latency=plan.latency.to_dict())
    return report, any(layer.status == "rewritten" for layer in layers)


def auto_layer_report(site: ConvSite, reason: str, choice, fams: dict) -> LayerReport:
    """A conv's report row under conv="auto": its family, rank, realization, error, MACs and
    parameters, and the measured layer ratio; or why it stayed dense."""
    rep = _layer_report(site, reason or (choice.reason if choice is not None else ""), None, None)
    if choice is None or choice.picked is None or site.weight is None:
        return rep
    form = choice.picked.form
    rep.status, rep.reason, rep.family = "rewritten", "", form.family
    rep.realization = form.realization
    rep.total_rank, rep.max_rank = form.rank, fams[form.family].max_rank(site)
    rep.macs_per_pixel_after = round(form.macs / site.pixels)
    rep.params_after = form.params + (site.params - int(site.weight.size))
    rep.relative_error = form.error
    rep.measured_ratio = {b: r["median"] for b, r in choice.picked.ratios.items()}
    return rep


def analyze(loaded: LoadedModel, run: RunOptions, budget: BudgetOptions) -> Analysis:
    """Find the model's convs (output sizes from shape inference, else one ONNX Runtime run at
    `run.input_shapes`) and load the alphas, which must name convs of the model."""
    model = loaded.model
    sites = find_convs(model, loaded.base_dir, run.input_shapes,
                       shape_probe=lambda names: probe_shapes(model, names, run.input_shapes, run.threads))
    alphas = load_alphas(budget.alphas)
    unknown = sorted(set(alphas) - {s.name for s in sites})
    if unknown:
        raise OptionError(f"{{0}} names convs that are not in the model: {literal(unknown[:5])}", "alphas")
    if sites and budget.mismatch_budget is not None and not alphas:
        raise OptionError("{0} needs non-empty {1}", "mismatch_budget", "alphas")
    return Analysis(sites, alphas)


def select(model: onnx.ModelProto, analysis: Analysis, selection: SelectionOptions,
           calibration: CalibrationOptions, run: RunOptions) -> Selection:
    """The convs that may be rewritten (`skip_reason`), each with its spectrum and alphas."""
    sites = analysis.sites
    reasons = skip_reasons(sites, selection)
    eligible = [s for s in sites if not reasons[s.name]]
    cands = [Candidate(s, spec, _alpha_for(s, analysis.alphas), weighted=s.name in analysis.alphas)
             for s, spec in zip(eligible, spectra(model, eligible, calibration, run))]
    return Selection(cands, reasons)


def plan_convs(selection: Selection, analysis: Analysis, model: onnx.ModelProto, opts: OptimizeOptions) -> BudgetPlan:
    """The budget's planner fills in the candidates' ranks; with the conv pass off, or no conv in
    the model (only FC layers come here then), there is nothing to plan and the budget applies to
    the FC layers alone."""
    if opts.selection.conv == "off" or not analysis.sites:
        budget = opts.budget.requested()
        budget.message = (f"{'the conv pass is off' if analysis.sites else 'the model has no Conv node'}: "
                          + ("the budget applies to the FC layers" if opts.selection.fc != "off" else "no budget applies"))
        return BudgetPlan(budget)
    return planner_for(opts).plan(selection.cands, analysis.sites, model)


def settle(selection: Selection, budget: BudgetOptions) -> list[Candidate]:
    """After planning: leave alone a candidate whose GDWS form would not cut MACs (unless `force`
    or decided by latency), record every candidate's reason, and return those to rewrite."""
    for c in selection.cands:
        if c.ranks is not None and not budget.force and budget.target == "macs" and \
                decompose.gdws_cost_per_pixel(c.spec, c.ranks) >= decompose.original_cost_per_pixel(c.spec):
            c.reason = OptionText(f"GDWS would not reduce MACs at the chosen ranks (G={int(c.ranks.sum())}); "
                                  "{0} to rewrite anyway", "force=True")
        selection.reasons[c.site.name] = selection.reasons[c.site.name] or c.reason
    return [c for c in selection.cands if not c.reason]


def decompose_chosen(chosen: list[Candidate]) -> list[LayerRewrite]:
    """Each chosen candidate's GDWS factors at its planned ranks and realization."""
    return [LayerRewrite(c.site, decompose.factors(c.spec, c.ranks, c.site.weight.dtype, c.multiplier, c.stacked))
            for c in chosen]


def finetune_step(model: onnx.ModelProto, original: str | bytes, opts: OptimizeOptions
                  ) -> tuple[onnx.ModelProto, dict]:
    """Recovery (`pipeline.recovery`): the rewritten model fine-tuned, distilling the original."""
    from gdws_onnx.pipeline.recovery import finetune_options, recover  # torch: only when asked

    teacher = load_model(original).model if isinstance(original, str) else onnx.load_from_string(original)
    c, run = opts.calibration, opts.run
    options = finetune_options(run.data, c.finetune, c.finetune_attack, c.finetune_eps, run.seed, run.threads)
    return recover(model, teacher, options, run.progress)


def keep_original(loaded: LoadedModel) -> str | bytes:
    """The original for the verification, taken before the model is rewritten in place: its path, or its bytes."""
    return loaded.path or loaded.model.SerializeToString()


def rewrite(model: onnx.ModelProto, rewrites: list[LayerRewrite]) -> None:
    """Replace each planned conv by its GDWS subgraph, in place."""
    GDWSRewritePass(rewrites).call(model)


def calibrate(model: onnx.ModelProto, rewrites: list[LayerRewrite], run: RunOptions) -> BiasCorrectionReport:
    """Bias correction of the rewritten convs on the calibration data (`run.data`), in place;
    returns its BiasCorrectionReport."""
    from gdws_onnx.calibrate.bias_correction import (
        BiasCorrectionPass,  # loads the attack code: only when asked
    )

    arrays, desc = data_arrays(run.data, CALIBRATION_SAMPLES)
    correction = BiasCorrectionPass(rewrites, named_inputs(model, arrays), threads=run.threads).call(model).report
    correction.inputs += f"; {desc}"
    return correction


def fold(model: onnx.ModelProto, chosen: list[Candidate]) -> dict[str, str]:
    """Fold the Gathers the plan chose to fold into their producers, in place; folded layer -> producer."""
    return FoldGatherPass([c.site.name for c in chosen if c.fold]).call(model).report.folded


def rewrite_fc_layers(model: onnx.ModelProto, base_dir: str, opts: OptimizeOptions) -> FCSummary | None:
    """With fc != "off": rewrite the Gemm/MatMul layers by that scheme (graph.fc), in place, at the
    error budget (each weight's relative squared error) or the MAC reduction (each layer's MACs / R);
    a layer whose factors would not cut MACs, or whose weight is under graph.fc.MIN_WEIGHT elements,
    is left alone unless `force`; include/exclude select FC layers by name as they select convs.
    Under target="latency", at the error budget, only where measured faster (pipeline.fc_latency;
    `force` there too lifts both the MAC check and MIN_WEIGHT)."""
    if opts.selection.fc == "off":
        return None
    from gdws_onnx.graph.fc import MIN_WEIGHT, rewrite_fc

    if opts.budget.target == "latency":
        from gdws_onnx.pipeline.fc_latency import rewrite_fc_by_latency

        report, lat = rewrite_fc_by_latency(model, base_dir, opts.selection, opts.budget, opts.timing, opts.run,
                                            min_weight=0 if opts.budget.force else MIN_WEIGHT)
        return FCSummary(opts.selection.fc, report.layers, report.skipped, lat.to_dict())
    result = rewrite_fc(model, opts.selection.fc, opts.budget.error_budget, opts.budget.mac_reduction,
                        min_weight=0 if opts.budget.force else MIN_WEIGHT, only_if_cheaper=not opts.budget.force,
                        base_dir=base_dir, input_shapes=opts.run.input_shapes,
                        exclude=lambda name: name_filter(name, opts.selection))
    return FCSummary(opts.selection.fc, result.report.layers, result.report.skipped)


def build_report(model: onnx.ModelProto, analysis: Analysis, selection: Selection, rewrites: list[LayerRewrite],
                 folded: dict[str, str], plan: BudgetPlan, opts: OptimizeOptions) -> OptimizeReport:
    """Every conv's report row (folds accounted), the budget with what it achieved, the options;
    the verification is not run yet."""
    by_name = {c.site.name: c for c in selection.cands}
    factors = {r.site.name: r.factors for r in rewrites}
    layers = [_layer_report(s, selection.reasons[s.name], by_name.get(s.name), factors.get(s.name))
              for s in analysis.sites]
    _account_folds(layers, model, folded)
    report = OptimizeReport(layers=layers, budget=plan.budget, verification=VerificationReport(ran=False),
                            options=opts.to_dict(), versions=versions(),
                            latency=None if plan.latency is None else plan.latency.to_dict(),
                            predicted_mismatch=predicted_mismatch(selection.cands, analysis.alphas))
    settle_budget(report, convs_planned=opts.selection.conv != "off")
    return report


def settle_budget(report: OptimizeReport, convs_planned: bool = True) -> None:
    """Set what the budget achieved (a latency budget's measured speed-up is set by its planner)
    and whether a MAC budget was met by the model as rewritten (when convs were planned)."""
    budget = report.budget
    if not convs_planned:
        return
    if budget.mode != "latency":
        budget.achieved = achieved(report)
    if budget.mode == "macs" and budget.met and report.mac_reduction is not None \
            and report.mac_reduction < budget.target * (1 - 1e-3):
        budget.met = False
        budget.message = mac_shortfall(report.mac_reduction, budget.target)


def verification(original: str | bytes | None, model: onnx.ModelProto | None, idle: str | None,
                 verify_opts: VerifyOptions, run: RunOptions) -> VerificationReport:
    """`verify` the rewritten model against the original, or say why it is not run (`idle`: why
    nothing was rewritten; None when something was)."""
    if not verify_opts.verify:
        return VerificationReport(ran=False, message="turned off")
    if idle is not None:
        return VerificationReport(ran=False, message=idle)
    src = original if isinstance(original, str) else onnx.ModelProto.FromString(original)
    return verify(src, model, verify_opts, run)


def achieved(report: OptimizeReport) -> float | None:
    """What the budget measured, in its target's unit: the largest rewritten layer's relative
    error (error), the conv MAC ratio (macs), the predicted mismatch (mismatch); None for a
    uniform rank. (The MAC ratio is always in the summary as mac_reduction.)"""
    mode = report.budget.mode
    if mode == "error":
        return max((layer.relative_error for layer in report.rewritten), default=0.0)
    return {"macs": report.mac_reduction, "mismatch": report.predicted_mismatch}.get(mode)


NO_CONV = "the model has no Conv node (in its top-level graph): nothing to rewrite, the model is unchanged"


def unchanged_report(opts: OptimizeOptions, message: str, timings: dict[str, float]) -> OptimizeReport:
    """The report of a run that rewrote nothing because there was nothing to rewrite (`message` says why)."""
    budget = opts.budget.requested()
    budget.message = message
    return OptimizeReport(layers=[], budget=budget,
                          verification=verification(None, None, "no conv was rewritten", opts.verification, opts.run),
                          options=opts.to_dict(), versions=versions(), timings=timings)


def optimize(model_or_path: onnx.ModelProto | str, **options) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Rewrite eligible convs of a model (object or path) into GDWS form.

    Keyword options are the flat options of OptimizeOptions (`error_budget=0.1, skip_first=False,
    ...`). Returns (optimized model, report); a model object passed in is not modified.
    """
    opts = OptimizeOptions.from_kwargs(**options)
    if isinstance(model_or_path, str):
        loaded = load_model(model_or_path)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model_or_path)
        loaded = LoadedModel(model=copy, path=None, base_dir="", external_data=False)
    return optimize_loaded(loaded, opts)
