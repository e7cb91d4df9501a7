"""`optimize`: analyze -> decompose -> allocate -> rewrite -> verify, in named steps."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from gdws_onnx.core import allocate, decompose
from gdws_onnx.pipeline import latency
from gdws_onnx.graph.convs import ConvSite, find_convs, node_label
from gdws_onnx.data import DataError, load_dataset
from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.fold import FoldGatherPass
from gdws_onnx.pipeline.candidates import DEFAULT_ERROR_BUDGET, Candidate
from gdws_onnx.pipeline.latency import Probe
from gdws_onnx.graph.model_io import LoadedModel, load_model
from gdws_onnx.pipeline.report import BudgetReport, LayerReport, OptimizeReport, VerificationReport
from gdws_onnx.provenance import versions
from gdws_onnx.graph.rewrite import GDWSRewritePass, LayerRewrite, layer_of
from gdws_onnx.runtime.session import (
    data_feeds,
    input_insensitive_outputs,
    make_session,
    probe_shapes,
    random_feeds,
    run_and_compare,
)

VERIFY_SAMPLES = 256  # samples of a --data set spec used for verification
CALIBRATION_SAMPLES = 1000  # samples of a --data set spec used by --bias-correction and --data-aware


@dataclass
class OptimizeOptions:
    """The options of `onnx-gdws optimize` (CLI flags in kebab-case, same meaning)."""

    error_budget: float | None = None  # per-layer relative weighted error, 0 <= eps < 1
    mac_reduction: float | None = None  # whole-model conv MACs / R
    mismatch_budget: float | None = None  # predicted top-1 mismatch sum alpha * e <= P (needs alphas)
    uniform_rank: int | None = None  # every channel of every candidate keeps min(g, max rank) terms (g=1: DWS)
    alphas: str | dict | None = None  # per-layer, per-channel weights (file or dict)
    skip_first: bool = True
    include: str | None = None  # regex on conv names
    exclude: str | None = None
    force: bool = False  # rewrite even when GDWS is not cheaper
    verify: bool = True
    data: str | None = None  # .npz with `x` (or arrays named after the inputs), or a data set spec
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    max_error: float | None = None  # gate on the relative output error
    seed: int = 0
    bias_correction: bool = False  # shift rewritten convs' biases by their mean output error on --data
    data_aware: float | None = None  # lam: truncate in the metric (1 - lam) I + lam S_c / s from --data
    width_multiple: int = 1  # round each layer's GDWS width G to a multiple (8: ORT CPU's fast conv widths)
    # hardware-aware allocation (target="latency")
    target: str = "macs"  # "macs": decide by MACs; "latency": by measured latency on `ep`
    ep: str = "cpu"
    batches: list[int] = field(default_factory=lambda: [1])
    threads: int | None = None
    latency_reduction: float | None = None  # whole-model latency / R
    cache: str | None = None  # latency-table JSON; None = the user cache, "" = no cache
    runs: int = 20  # timed runs per measurement (the first look; more are added until decided)
    max_rounds: int = 320  # cap on the interleaved rounds of one latency comparison
    measure_seconds: float = 10.0  # cap on the timing of one latency comparison
    probe_factory: Callable[[int, str], Probe] | None = None  # (batch, "layer"|"model") -> Probe

    def validate(self) -> None:
        budgets = [b for b in (self.error_budget, self.mac_reduction, self.latency_reduction, self.mismatch_budget,
                               self.uniform_rank) if b is not None]
        if len(budgets) > 1:
            raise GDWSError("give one of --error-budget, --mac-reduction, --latency-reduction, "
                            "--mismatch-budget, --uniform-rank, not several")
        if self.uniform_rank is not None:
            if self.uniform_rank < 1:
                raise GDWSError(f"--uniform-rank must be >= 1, got {self.uniform_rank}")
            if self.target != "macs":
                raise GDWSError("--uniform-rank fixes the ranks; it cannot be used with --target latency")
        if self.mismatch_budget is not None:
            if not 0 < self.mismatch_budget < 1:
                raise GDWSError(f"--mismatch-budget must be in (0, 1), got {self.mismatch_budget}")
            if self.alphas is None:
                raise GDWSError("--mismatch-budget needs --alphas (noise-gain weights from `onnx-gdws sensitivity`)")
            if self.target != "macs":
                raise GDWSError("--mismatch-budget decides by MACs; it cannot be used with --target latency")
        if self.bias_correction and not self.data:
            raise GDWSError("--bias-correction needs --data (calibration inputs)")
        if self.width_multiple < 1:
            raise GDWSError(f"--width-multiple must be >= 1, got {self.width_multiple}")
        if self.data_aware is not None:
            if not 0 < self.data_aware <= 1:
                raise GDWSError(f"--data-aware must be in (0, 1], got {self.data_aware}")
            if not self.data:
                raise GDWSError("--data-aware needs --data (calibration inputs)")
        if self.target not in ("macs", "latency"):
            raise GDWSError(f"--target must be 'macs' or 'latency', got {self.target!r}")
        if self.latency_reduction is not None and self.target != "latency":
            raise GDWSError("--latency-reduction needs --target latency")
        if self.mac_reduction is not None and self.target == "latency":
            raise GDWSError("--mac-reduction decides by MACs; with --target latency use --latency-reduction")
        if self.latency_reduction is not None and not self.latency_reduction >= 1:
            raise GDWSError(f"--latency-reduction must be >= 1, got {self.latency_reduction}")
        if not self.batches or any(b < 1 for b in self.batches) or self.runs < 3:
            raise GDWSError("--batch needs positive sizes and --runs at least 3")
        if self.max_rounds < 1 or not self.measure_seconds > 0:
            raise GDWSError("--max-rounds must be >= 1 and --measure-seconds > 0")
        if self.error_budget is not None and not 0 <= self.error_budget < 1:
            raise GDWSError(f"--error-budget must be in [0, 1), got {self.error_budget}")
        if self.mac_reduction is not None and not self.mac_reduction >= 1:
            raise GDWSError(f"--mac-reduction must be >= 1, got {self.mac_reduction}")
        if self.max_error is not None and not self.max_error >= 0:
            raise GDWSError(f"--max-error must be >= 0, got {self.max_error}")
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise GDWSError(f"{flag} is not a valid regular expression: {e}") from None


def load_alphas(source: str | dict | None) -> dict[str, np.ndarray]:
    """Per-layer alpha vectors keyed by conv name, from a dict, a .json or an .npz file."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return {k: np.asarray(v, dtype=np.float64) for k, v in source.items()}
    if not os.path.isfile(source):
        raise GDWSError(f"--alphas file not found: {source}")
    try:
        if source.endswith(".npz"):
            with np.load(source) as z:
                return {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
        with open(source) as f:
            return {k: np.asarray(v, dtype=np.float64) for k, v in json.load(f).items()}
    except (ValueError, OSError) as e:
        raise GDWSError(f"cannot read --alphas {source}: {e}") from None


def _alpha_for(site: ConvSite, alphas: dict[str, np.ndarray]) -> np.ndarray:
    a = alphas.get(site.name, np.ones(1))
    if a.size not in (1, site.in_channels) or np.any(a < 0) or not np.all(np.isfinite(a)):
        raise GDWSError(f"alphas for '{site.name}' must be 1 or {site.in_channels} non-negative "
                        f"finite values, got {a.size}")
    return np.broadcast_to(a.ravel(), (site.in_channels,)).astype(np.float64)


def skip_reason(site: ConvSite, first: bool, opts: OptimizeOptions) -> str:
    """Why a conv is not a candidate ('' if it is)."""
    if site.weight is None:
        return site.weight_source
    if site.kernel_size == 1:
        return "1x1 conv (already pointwise)"
    if site.in_channels // site.group == 1 and site.out_channels // site.group == 1:
        return "depthwise conv (nothing to gain)"
    if first and opts.skip_first:
        return "first conv (--no-skip-first to include)"
    if opts.include is not None and not re.search(opts.include, site.name):
        return "not matched by --include"
    if opts.exclude is not None and re.search(opts.exclude, site.name):
        return "matched by --exclude"
    return ""


def _allocate(cands: list[Candidate], sites: list[ConvSite], opts: OptimizeOptions) -> BudgetReport:
    """Choose ranks for every candidate by error, MAC or mismatch budget; set `reason` on those left alone."""
    if opts.mismatch_budget is not None:
        return _allocate_mismatch(cands, sites, opts.mismatch_budget)
    if opts.uniform_rank is not None:
        for c in cands:
            c.ranks = np.full(c.spec.in_channels, min(opts.uniform_rank, c.spec.max_rank), dtype=np.int64)
        return BudgetReport(mode="uniform", target=opts.uniform_rank, achieved=None)
    if opts.mac_reduction is None:
        eps = DEFAULT_ERROR_BUDGET if opts.error_budget is None else opts.error_budget
        for c in cands:
            c.ranks, _ = allocate.relative_lego(decompose.scores(c.spec, c.alpha), eps, c.site.weight.dtype)
        return BudgetReport(mode="error", target=eps, achieved=None)

    _require_sizes([s for s in sites if s.weight is not None], "--mac-reduction", "every conv's")
    cand_names = {c.site.name for c in cands}
    fixed = sum(s.pixels * s.macs_per_pixel for s in sites if s.weight is not None and s.name not in cand_names)
    total = fixed + sum(c.site.pixels * c.site.macs_per_pixel for c in cands)
    layers = [allocate.LayerCost(
        scores=decompose.scores(c.spec, c.alpha),
        term_cost=c.site.pixels * (c.spec.kernel_size + c.spec.out_channels / c.spec.groups),
        original_cost=c.site.pixels * c.site.macs_per_pixel) for c in cands]
    result = allocate.allocate_macs(layers, total / opts.mac_reduction - fixed)
    for c, r in zip(cands, result.ranks):
        c.ranks = r
        if r is None:
            c.reason = "not chosen by the MAC budget (GDWS would not be cheaper)"
    return BudgetReport(mode="macs", target=opts.mac_reduction, achieved=None, met=result.feasible,
                        message="" if result.feasible else
                        "budget cannot be met with the eligible layers: every rewritten layer keeps one term")


def _require_sizes(sites: list[ConvSite], flag: str, which: str) -> None:
    """Raise GDWSError unless every site's output size is known, saying why it is not."""
    unknown = [s for s in sites if s.pixels is None]
    if unknown:
        names = [s.name for s in unknown]
        why = unknown[0].shape_note or "shape inference cannot see it"
        raise GDWSError(f"{flag} needs {which} output size; it is unknown for {names[:3]}"
                        f"{'...' if len(names) > 3 else ''}: {why}")


def _round_widths(cands: list[Candidate], multiple: int, down: bool) -> None:
    """Round every chosen layer's GDWS width to a multiple: up (extra terms, less error) except
    under a MAC budget, where the lowest-value terms go instead so the budget stays met."""
    for c in cands:
        if c.ranks is not None:
            c.ranks = allocate.round_width(decompose.scores(c.spec, c.alpha), c.ranks, c.spec.channel_group(),
                                           multiple, down=down)


def _allocate_mismatch(cands: list[Candidate], sites: list[ConvSite], budget: float) -> BudgetReport:
    """One global greedy over all candidates' alpha s^2 / cost terms (allocate.allocate_mismatch)."""
    _require_sizes([c.site for c in cands], "--mismatch-budget", "every candidate conv's")
    layers = [allocate.LayerCost(
        scores=decompose.scores(c.spec, c.alpha),
        term_cost=c.site.pixels * (c.spec.kernel_size + c.spec.out_channels / c.spec.groups),
        original_cost=c.site.pixels * c.site.macs_per_pixel) for c in cands]
    result = allocate.allocate_mismatch(layers, budget)
    for c, r in zip(cands, result.ranks):
        c.ranks = r
        if r is None:
            c.reason = "not chosen by the mismatch budget (no term fits that makes GDWS cheaper)"
    return BudgetReport(mode="mismatch", target=budget, achieved=None)


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
        rep.status = "rewritten"
        identity = np.array_equal(factors.gather, np.arange(site.in_channels))
        rep.realization = ("multiplier dw+pw" if factors.multiplier else
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


def data_arrays(data: str, n: int) -> tuple[dict[str, np.ndarray], str]:
    """Arrays of a --data value (an .npz: all of it; a data set spec: its first n samples) and a
    description of them."""
    if data.lower().endswith(".npz"):
        if not os.path.isfile(data):
            raise GDWSError(f"--data file not found: {data}")
        try:
            with np.load(data) as z:
                return {k: z[k] for k in z.files}, f"data file {data}"
        except (ValueError, OSError) as e:
            raise GDWSError(f"cannot read --data {data}: {e}") from None
    try:  # a data set spec shared with validate: fashion-mnist:test, an image folder
        ds = load_dataset(data, n=n)
    except (DataError, ValueError, OSError) as e:
        raise GDWSError(f"--data {data}: {e}") from None
    return {"x": ds.x}, f"the first {len(ds.x)} samples of {ds.name}"


def verify(original: onnx.ModelProto | str, optimized: onnx.ModelProto, opts: OptimizeOptions
           ) -> VerificationReport:
    """Run both models in ONNX Runtime on the same inputs and compare every output; flag the outputs
    that do not depend on the input (the original on a second, different input gives the same values),
    and call the verification vacuous when that holds for all of them."""
    ref = make_session(original)
    new = make_session(optimized)
    if opts.data:
        arrays, desc = data_arrays(opts.data, VERIFY_SAMPLES)
        feeds = data_feeds(ref, arrays)
    else:
        try:
            feeds = random_feeds(ref, opts.input_shapes, seed=opts.seed)
        except GDWSError as e:
            return VerificationReport(ran=False, message=str(e))
        desc = "random inputs in [0,1) (seed {}, shapes {})".format(
            opts.seed, ", ".join(f"{k}:{','.join(map(str, v.shape))}" for k, v in feeds.items()))
    names = [o.name for o in ref.get_outputs()]
    reference = dict(zip(names, ref.run(names, feeds)))
    outputs = run_and_compare(ref, new, feeds, reference)
    passed = opts.max_error is None or all(o.relative <= opts.max_error for o in outputs)
    constant = input_insensitive_outputs(ref, feeds, reference, seed=opts.seed + 1) or []
    return VerificationReport(ran=True, inputs=desc, outputs=outputs, max_error=opts.max_error, passed=passed,
                              constant_outputs=constant, vacuous=bool(outputs) and len(constant) == len(outputs))


def _spectra(model: onnx.ModelProto, sites: list[ConvSite], opts: OptimizeOptions) -> list[decompose.Spectrum]:
    """Each site's per-channel spectrum: weight-space SVD, or with --data-aware the SVD in the
    metric blended from the channel's input second moments on the calibration data."""
    if opts.data_aware is None or not sites:
        return [decompose.spectrum(s.weight, s.group) for s in sites]
    from gdws_onnx.calibrate.data_aware import blended_metric, channel_second_moments  # loads the attack code: only when asked

    arrays, _ = data_arrays(opts.data, CALIBRATION_SAMPLES)
    second = channel_second_moments(model, _named_inputs(model, arrays), sites, threads=opts.threads)
    return [decompose.metric_spectrum(s.weight, s.group, blended_metric(second[s.name], opts.data_aware))
            for s in sites]


def optimize_loaded(loaded: LoadedModel, opts: OptimizeOptions) -> tuple[onnx.ModelProto, OptimizeReport]:
    """The pipeline on a loaded model; the model object is rewritten in place."""
    opts.validate()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = loaded.model
    sites = find_convs(model, loaded.base_dir, opts.input_shapes,
                       shape_probe=lambda names: probe_shapes(model, names, opts.input_shapes, opts.threads))
    alphas = load_alphas(opts.alphas)
    unknown = sorted(set(alphas) - {s.name for s in sites})
    if unknown:
        raise GDWSError(f"--alphas names convs that are not in the model: {unknown[:5]}")
    if not sites:  # a valid model with nothing to rewrite: returned as it is, not an error
        timings["analyze"] = time.perf_counter() - t0
        return model, unchanged_report(opts, NO_CONV, timings)
    if opts.mismatch_budget is not None and not alphas:
        raise GDWSError("--mismatch-budget needs non-empty --alphas")
    timings["analyze"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reasons = {s.name: skip_reason(s, i == 0, opts) for i, s in enumerate(sites)}
    eligible = [s for s in sites if not reasons[s.name]]
    cands = [Candidate(s, spec, _alpha_for(s, alphas)) for s, spec in zip(eligible, _spectra(model, eligible, opts))]
    missing = [c.site.name for c in cands if c.site.name not in alphas]
    if opts.mismatch_budget is not None and missing:
        raise GDWSError("--mismatch-budget needs alphas for every rewritable conv; --alphas has none "
                        f"for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    latency_report = None
    if opts.target == "latency":
        budget, latency_report = latency.plan(cands, model, opts)
    else:
        budget = _allocate(cands, sites, opts)
        if opts.width_multiple > 1 and budget.mode != "uniform":
            _round_widths(cands, opts.width_multiple, down=budget.mode == "macs")
    for c in cands:
        if c.ranks is not None and not opts.force and opts.target == "macs" and \
                decompose.gdws_cost_per_pixel(c.spec, c.ranks) >= decompose.original_cost_per_pixel(c.spec):
            c.reason = (f"GDWS would not reduce MACs at the chosen ranks (G={int(c.ranks.sum())}); "
                        "--force to rewrite anyway")
        reasons[c.site.name] = reasons[c.site.name] or c.reason
    chosen = [c for c in cands if not c.reason]
    rewrites = [LayerRewrite(c.site, decompose.factors(c.spec, c.ranks, c.site.weight.dtype, c.multiplier))
                for c in chosen]
    timings["decompose"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    original_src: onnx.ModelProto | str | None = None
    if opts.verify:  # keep the original for the comparison before it is rewritten in place
        original_src = loaded.path or model.SerializeToString()
    GDWSRewritePass(rewrites).call(model)
    timings["rewrite"] = time.perf_counter() - t0
    correction = None
    if opts.bias_correction and rewrites:
        t0 = time.perf_counter()
        from gdws_onnx.calibrate.bias_correction import correct_biases  # loads the attack code: only when asked

        arrays, desc = data_arrays(opts.data, CALIBRATION_SAMPLES)
        correction = correct_biases(model, rewrites, _named_inputs(model, arrays), threads=opts.threads)
        correction.inputs += f"; {desc}"
        timings["bias_correction"] = time.perf_counter() - t0

    folds = FoldGatherPass([c.site.name for c in chosen if c.fold])
    folds.call(model)

    by_name = {c.site.name: c for c in cands}
    factors = {r.site.name: r.factors for r in rewrites}
    layers = [_layer_report(s, reasons[s.name], by_name.get(s.name), factors.get(s.name)) for s in sites]
    _account_folds(layers, model, folds.folded)
    report = OptimizeReport(layers=layers, budget=budget, verification=VerificationReport(ran=False),
                            options=_options_dict(opts), versions=versions(), latency=latency_report,
                            predicted_mismatch=predicted_mismatch(cands, alphas),
                            bias_correction=None if correction is None else correction.to_dict())
    if budget.mode != "latency":  # latency: the measured speed-up, set by latency.plan
        report.budget.achieved = achieved(report)
    if budget.mode == "macs" and budget.met and report.mac_reduction is not None \
            and report.mac_reduction < budget.target * (1 - 1e-3):
        budget.met = False
        budget.message = (f"reached conv MACs / {report.mac_reduction:.3f}, short of / {budget.target:g}: "
                          "the eligible layers cannot give more")

    t0 = time.perf_counter()
    if not opts.verify:
        report.verification.message = "--no-verify"
    elif not rewrites:
        report.verification.message = "no conv was rewritten"
    else:
        src = original_src if isinstance(original_src, str) else onnx.ModelProto.FromString(original_src)
        report.verification = verify(src, model, opts)
    timings["verify"] = time.perf_counter() - t0
    report.timings = timings
    return model, report


def achieved(report: OptimizeReport) -> float | None:
    """What the budget measured, in its target's unit: the largest rewritten layer's relative
    error (error), the conv MAC ratio (macs), the predicted mismatch (mismatch); None for a
    uniform rank. (The MAC ratio is always in the summary as mac_reduction.)"""
    mode = report.budget.mode
    if mode == "error":
        return max((layer.relative_error for layer in report.rewritten), default=0.0)
    return {"macs": report.mac_reduction, "mismatch": report.predicted_mismatch}.get(mode)


NO_CONV = "the model has no Conv node (in its top-level graph): nothing to rewrite, the model is unchanged"


def requested_budget(opts: OptimizeOptions) -> BudgetReport:
    """The budget the options ask for (mode and target), before anything is allocated."""
    for mode, target in (("macs", opts.mac_reduction), ("mismatch", opts.mismatch_budget),
                         ("uniform", opts.uniform_rank), ("latency", opts.latency_reduction)):
        if target is not None:
            return BudgetReport(mode=mode, target=target, achieved=None)
    return BudgetReport(mode="error", target=DEFAULT_ERROR_BUDGET if opts.error_budget is None else opts.error_budget,
                        achieved=None)


def unchanged_report(opts: OptimizeOptions, message: str, timings: dict[str, float]) -> OptimizeReport:
    """The report of a run that rewrote nothing because there was nothing to rewrite (`message` says why)."""
    budget = requested_budget(opts)
    budget.message = message
    return OptimizeReport(layers=[], budget=budget,
                          verification=VerificationReport(ran=False, message="--no-verify" if not opts.verify
                                                          else "no conv was rewritten"),
                          options=_options_dict(opts), versions=versions(), timings=timings)


def _named_inputs(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Calibration arrays keyed by graph input: by name, or `x` for a single-input model."""
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) == 1 and names[0] not in arrays and "x" in arrays:
        arrays = {names[0]: arrays["x"]}
    missing = [k for k in names if k not in arrays]
    if missing:
        raise GDWSError(f"--data has no array for input(s) {missing}; give 'x' or arrays named after inputs")
    return {k: arrays[k] for k in names}


def _options_dict(opts: OptimizeOptions) -> dict:
    d = asdict(opts)
    d.pop("probe_factory")
    if isinstance(opts.alphas, dict):
        d["alphas"] = "<dict>"
    return d


def optimize(model_or_path: onnx.ModelProto | str, **options) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Rewrite eligible convs of a model (object or path) into GDWS form.

    Keyword options are the fields of OptimizeOptions. Returns (optimized model, report);
    a model object passed in is not modified.
    """
    opts = OptimizeOptions(**options)
    if isinstance(model_or_path, str):
        loaded = load_model(model_or_path)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model_or_path)
        loaded = LoadedModel(model=copy, path=None, base_dir="", external_data=False)
    return optimize_loaded(loaded, opts)
