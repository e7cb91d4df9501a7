"""Clean and robust accuracy of an original and an optimized ONNX classifier (no CLI).

`validate(original, optimized, data=..., attacks=("pgd",), eps=0.1)` loads the same fixed
samples for both models, measures clean accuracy, agreement and output error, gates each
model's gradient source against ONNX Runtime, attacks EACH model with its own gradients
(white-box), and returns a `ValidationReport` whose gates say whether the drops are acceptable.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx

from gdws_onnx.eval.attacks import ATTACKS, AttackSettings, autoattack, pgd, square_linf
from gdws_onnx.data import DataError, load_dataset
from gdws_onnx.errors import GateFailed, GDWSError, OptionError
from gdws_onnx.eval.gradients.classifier import OrtClassifier
from gdws_onnx.eval.gradients.gate import check_gradient_source
from gdws_onnx.eval.gradients.qdq import activation_quantizers
from gdws_onnx.eval.gradients.sources import (
    DEFAULT_SOURCE,
    SOURCE_PACKAGES,
    SOURCES,
    installed_sources,
    make_source,
    package_installed,
)
from gdws_onnx.graph.model_io import load_model
from gdws_onnx.provenance import json_default, versions
from gdws_onnx.core.stats import error_stats, mcnemar_exact, proportion

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (description, total) -> advance
GRADIENT_CHOICES = ("auto", *SOURCES)
WHITE_BOX = ("pgd", "pgd-l2", "autoattack")
VALIDATE_EXTRA = 'pip install -e ".[validate]"'


def _literal(text: str) -> str:
    """`text` escaped for an OptionError template (its braces are not placeholders)."""
    return text.replace("{", "{{").replace("}", "}}")


def check_attack_requirements(attacks: tuple[str, ...] | list[str], gradient: str = "auto") -> None:
    """Raise GDWSError, before any work, when an attack needs a package that is not installed:
    white-box attacks need a gradient source (`gradient`: "auto" = any of SOURCES, else that one),
    AutoAttack also needs torch and torchattacks. Square needs nothing beyond ONNX Runtime.
    Nothing is imported (instant)."""
    white = [a for a in attacks if a in WHITE_BOX]
    if not white:
        return
    wanted = SOURCES if gradient == "auto" else (gradient,)
    if not set(wanted) & set(installed_sources()):
        how = " or ".join(f"{s} ({SOURCE_PACKAGES[s][1]})" for s in wanted)
        raise GDWSError(f"the white-box attack {', '.join(white)} needs input gradients and no gradient source "
                        f"{'is' if gradient == 'auto' else f'{gradient!r} is'} installed: install {how}; "
                        f"{VALIDATE_EXTRA} installs both. The square attack needs forward passes only.")
    if "autoattack" in attacks and not (package_installed("torch") and package_installed("torchattacks")):
        raise GDWSError("AutoAttack needs torch and torchattacks: pip install torch==2.13.0 && "
                        "pip install --no-deps torchattacks==3.5.1")


@dataclass
class ValidateOptions:
    """Everything `validate` needs besides the two models."""

    data: str = "fashion-mnist:test"
    n: int | None = None
    batch_size: int = 128
    attacks: tuple[str, ...] = ("pgd",)
    eps: float = 0.1
    steps: int = 20
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    queries: int = 1000
    seed: int = 0
    gradient: str = "auto"
    gradient_check_samples: int = 8
    max_drop_clean: float | None = None  # percentage points
    max_drop_robust: float | None = None
    threads: int | None = None  # intra-op threads of ONNX Runtime and of the gradient source (None: theirs)

    def check(self) -> None:
        """Raise OptionError (a GDWSError naming the fields) for inconsistent options."""
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise GDWSError(f"unknown attack(s) {bad}; choose from {', '.join(ATTACKS)}")
        if self.eps < 0:
            raise OptionError(f"{{0}} must be >= 0, got {self.eps}", "eps")
        if self.n is not None and self.n < 1:
            raise OptionError(f"{{0}} must be >= 1, got {self.n}", "n")
        if self.batch_size < 1 or self.steps < 0 or self.restarts < 1 or self.queries < 0:
            raise OptionError("{0} and {1} must be >= 1, {2} and {3} >= 0", "batch_size", "restarts", "steps",
                              "queries")
        if self.gradient not in GRADIENT_CHOICES:
            raise OptionError(f"{{0}} must be one of {', '.join(GRADIENT_CHOICES)}", "gradient")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"{{0}} must be >= 1, got {self.threads}", "threads")
        if self.max_drop_robust is not None and not self.attacks:
            raise OptionError("{0} needs an attack", "max_drop_robust")
        for name in ("max_drop_clean", "max_drop_robust"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise OptionError("{0} must be >= 0 percentage points", name)

    def settings(self, name: str) -> AttackSettings:
        return AttackSettings(name=name, eps=self.eps, steps=self.steps, step_size=self.step_size,
                              restarts=self.restarts, random_start=self.random_start,
                              queries=self.queries, seed=self.seed)


@dataclass
class ModelResult:
    """One model's numbers (accuracies are fractions in [0, 1])."""

    path: str
    clean_accuracy: float
    clean_accuracy_interval: list[float]
    robust_accuracy: float | None  # pointwise worst case over the attacks run
    robust_accuracy_interval: list[float] | None
    robust_accuracy_by_attack: dict[str, float]
    gradient_source: str | None
    gradient_check: dict | None
    softmax_cut: bool
    predictions: list[int]
    robust_correct: list[bool] | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ValidationReport:
    """Everything `validate` measured; `passed` is False when a drop gate was exceeded."""

    original: ModelResult
    optimized: ModelResult
    agreement: float  # fraction of samples where the two models' clean top-1 predictions agree
    agreement_interval: list[float]
    clean_drop_pp: float  # original - optimized, percentage points
    robust_drop_pp: float | None
    clean_difference_test: dict
    robust_difference_test: dict | None
    output_error: dict
    attacks: list[dict]
    data: dict
    gates: dict
    warnings: list[str]
    versions: dict
    timings: dict[str, float]
    # robust correctness from original to optimized: lost, gained, change and its approximate 95 % interval
    robust_change: dict | None = None

    @property
    def passed(self) -> bool:
        return bool(self.gates.get("passed", True))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=json_default)


def _as_model(m: onnx.ModelProto | str) -> tuple[onnx.ModelProto, str]:
    if isinstance(m, onnx.ModelProto):
        return m, "<in-memory>"
    return load_model(m).model, str(m)


def _pick_source(model: onnx.ModelProto, ort_model: OrtClassifier, x: np.ndarray, y: np.ndarray,
                 opts: ValidateOptions, warnings: list[str], label: str):
    """Build and gate a gradient source: (source, check dict). GateFailed when a source was built
    but failed the gate, GDWSError when none could be built (the white-box attack is not replaced by
    a weaker one under its name)."""
    order = [opts.gradient] if opts.gradient != "auto" else [DEFAULT_SOURCE] + [s for s in SOURCES
                                                                                  if s != DEFAULT_SOURCE]
    errors, failed_check = [], None
    for name in order:
        try:
            src = make_source(model, name, batch_size=min(opts.batch_size, 64), threads=opts.threads)
            chk = check_gradient_source(src, ort_model, x, y, seed=opts.seed)
        except GDWSError as e:
            errors.append(f"{name}: {e}")
            continue
        if chk.passed:
            if errors:
                warnings.append(f"{label}: gradient source {name} used because " + "; ".join(errors))
            return src, chk.to_dict()
        failed_check = chk
        errors.append(f"{name}: gate failed: {chk.message}")
    if failed_check is not None:
        raise GateFailed(f"{label}: no gradient source passed the ORT parity / finite-difference gate: "
                         + "; ".join(errors))
    raise GDWSError(f"{label}: no gradient source can differentiate this model ({'; '.join(errors)}); "
                    "white-box attacks need one, the square attack needs forward passes only")


BPDA_WARNING = ("gradients through QuantizeLinear/DequantizeLinear are straight-through (BPDA); "
                "Square over ONNX Runtime also run")


def evaluate_model(model: onnx.ModelProto, path: str, x: np.ndarray, y: np.ndarray, opts: ValidateOptions,
                    warnings: list[str], label: str, progress: ProgressFactory | None,
                    quantized_pair: bool = False) -> tuple[ModelResult, np.ndarray]:
    """One model's clean and robust accuracy. `quantized_pair`: one of the two models is QDQ
    (BPDA gradients), so Square over ORT joins the white-box attacks on both models: on the
    quantized one because straight-through gradients are an approximation, on the other so that
    the robust drop compares the same attacks."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    clf = OrtClassifier(model, batch_size=opts.batch_size, threads=opts.threads)
    _check_input(clf, x, path)
    logits = clf(x)
    timings["clean"] = time.perf_counter() - t0
    if logits.ndim != 2:
        raise GDWSError(f"{path}: output has shape {logits.shape}; validate needs (N, classes) logits")
    classes = logits.shape[1]
    if y.max(initial=0) >= classes:
        raise GDWSError(f"{path}: labels go up to {int(y.max())} but the model has {classes} outputs")
    pred = logits.argmax(1)
    correct = pred == y
    cp = proportion(correct)
    by_attack: dict[str, float] = {}
    robust = None
    src, chk, src_name = None, None, None
    attacks = list(opts.attacks)
    white_box = any(a in WHITE_BOX for a in attacks)
    if quantized_pair and white_box and "square" not in attacks:
        attacks.append("square")
    if white_box:
        t0 = time.perf_counter()
        k = min(opts.gradient_check_samples, len(x))
        src, chk = _pick_source(model, clf, x[:k], y[:k], opts, warnings, label)
        timings["gradient_check"] = time.perf_counter() - t0
        src_name = src.name
        if getattr(src, "bpda", False):
            warnings.append(f"{label}: {BPDA_WARNING}")
            if "square" not in attacks:
                attacks.append("square")
        elif quantized_pair and "square" not in opts.attacks:
            warnings.append(f"{label}: Square over ONNX Runtime also run, as on the quantized model, so that "
                            "both models face the same attacks")
    if attacks:
        robust = correct.copy()
    for name in attacks:
        settings = opts.settings(name)
        adv = progress(f"{label}: {name}", len(x)) if progress else None
        if name in ("pgd", "pgd-l2"):
            res = pgd(clf, src, x, y, settings, batch_size=opts.batch_size, progress=adv)
        elif name == "square":
            res = square_linf(clf, x, y, settings, batch_size=opts.batch_size, progress=adv)
        else:
            res = autoattack(clf, src, x, y, settings, n_classes=classes, batch_size=opts.batch_size,
                             progress=adv)
        by_attack[name] = float(res.robust.mean())
        robust &= res.robust
        timings[name] = res.seconds
        timings[f"{name}_model"] = res.model_seconds
    white = [by_attack[a] for a in by_attack if a in WHITE_BOX]
    if "square" in by_attack and white and by_attack["square"] < min(white):
        warnings.append(f"{label}: Square ({by_attack['square']:.4f}) beats the white-box attacks "
                        f"({min(white):.4f}): gradients may be masked")
    rp = proportion(robust) if robust is not None else None
    return ModelResult(
        path=path, clean_accuracy=cp.value, clean_accuracy_interval=[cp.low, cp.high],
        robust_accuracy=None if rp is None else rp.value,
        robust_accuracy_interval=None if rp is None else [rp.low, rp.high],
        robust_accuracy_by_attack=by_attack, gradient_source=src_name, gradient_check=chk,
        softmax_cut=clf.softmax_cut, predictions=[int(p) for p in pred],
        robust_correct=None if robust is None else [bool(r) for r in robust], timings=timings,
    ), logits


def _check_input(clf: OrtClassifier, x: np.ndarray, path: str) -> None:
    shape = clf.session.get_inputs()[0].shape
    want = [d if isinstance(d, int) else None for d in shape]
    got = list(x.shape)
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want[1:], got[1:])):
        raise GDWSError(f"{path}: input {clf.input_name} has shape {shape}, the data gives {got}")


def validate(original: onnx.ModelProto | str, optimized: onnx.ModelProto | str,
             options: ValidateOptions | None = None, *, x: np.ndarray | None = None,
             y: np.ndarray | None = None, progress: ProgressFactory | None = None,
             **kwargs) -> ValidationReport:
    """Clean and robust accuracy of both models on the same samples, and the gates.

    Data come from `options.data` (gdws_onnx.data.load_dataset spec; first `n` samples), or
    from arrays `x` (N x C x H x W in [0, 1]) and `y`. Keyword arguments set ValidateOptions
    fields. Raises GDWSError on bad input or, before any work, when a white-box attack has no
    installed gradient source; GateFailed when no gradient source passes the pre-attack gate;
    drop gates are reported in `report.gates` (the CLI turns them into exit 1)."""
    start = time.perf_counter()
    opts = options or ValidateOptions()
    for k, v in kwargs.items():
        if not hasattr(opts, k):
            raise TypeError(f"validate() got an unexpected keyword argument {k!r}")
        setattr(opts, k, v)
    if isinstance(opts.attacks, str):
        opts.attacks = tuple(a.strip() for a in opts.attacks.split(",") if a.strip())
    opts.check()
    check_attack_requirements(opts.attacks, opts.gradient)
    t0 = time.perf_counter()
    x, y, data_name, indices = load_samples(opts, x, y)
    load_s = time.perf_counter() - t0
    warnings: list[str] = []
    m_a, p_a = _as_model(original)
    m_b, p_b = _as_model(optimized)
    pair = bool(activation_quantizers(m_a) or activation_quantizers(m_b))
    res_a, logits_a = evaluate_model(m_a, p_a, x, y, opts, warnings, "original", progress, pair)
    res_b, logits_b = evaluate_model(m_b, p_b, x, y, opts, warnings, "optimized", progress, pair)
    data = {"spec": data_name, "n": int(len(x)), "indices": [int(i) for i in indices],
            "shape": list(x.shape[1:]), "batch_size": opts.batch_size}
    report = paired_report(res_a, res_b, y, logits_a, logits_b, opts, data, warnings, pair)
    report.timings = {"load_data": load_s, "total": time.perf_counter() - start}
    return report


def load_samples(opts: ValidateOptions, x: np.ndarray | None = None, y: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """(x, y, data name, indices) as `validate` uses them: `opts.data`'s first `opts.n` samples, or
    the first `opts.n` of the arrays `x`, `y`; x float32 in [0, 1], y int64. OptionError naming
    `data` for a data set that cannot be loaded; GDWSError without labels or outside [0, 1]."""
    if x is None:
        try:
            ds = load_dataset(opts.data, n=opts.n)
        except (DataError, ValueError, OSError) as e:
            raise OptionError(f"{{0}} {_literal(opts.data)}: {_literal(str(e))}", "data") from None
        x, y, data_name, indices = ds.x, ds.y, ds.name, ds.indices
    else:
        n = len(x) if opts.n is None else min(opts.n, len(x))
        x, y, data_name, indices = x[:n], None if y is None else y[:n], "<arrays>", np.arange(n)
    if y is None:
        raise GDWSError("validate needs labels (the data set has none)")
    x = np.ascontiguousarray(x, np.float32)
    y = np.asarray(y, np.int64)
    if x.size and (x.min() < 0 or x.max() > 1):
        raise GDWSError("inputs must lie in [0, 1] (normalisation belongs inside the model) so that eps "
                        "is in pixel space")
    return x, y, data_name, indices


def paired_change(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Paired change from a to b of per-sample correctness: samples `lost` (right under a, wrong
    under b) and `gained`, b's accuracy minus a's (`change`) and its approximate 95 % interval
    (`low`, `high`: normal approximation of the paired difference)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    n, lost, gained = len(a), int((a & ~b).sum()), int((~a & b).sum())
    change = (gained - lost) / n if n else 0.0
    se = np.sqrt(max(lost + gained - (gained - lost) ** 2 / n, 0.0)) / n if n else 0.0
    return {"lost": lost, "gained": gained, "change": change, "low": change - 1.96 * se,
            "high": change + 1.96 * se}


def paired_report(res_a: ModelResult, res_b: ModelResult, y: np.ndarray, logits_a: np.ndarray,
                  logits_b: np.ndarray, opts: ValidateOptions, data: dict, warnings: list[str],
                  quantized_pair: bool = False) -> ValidationReport:
    """The paired comparison of two models' results on the same samples (labels `y`, clean logits):
    agreement, drops, McNemar on clean and robust correctness, lost / gained, output error, and the
    drop gates of `opts`. `validate` and the comparison of two result files both end here."""
    ca = np.asarray(res_a.predictions) == y
    cb = np.asarray(res_b.predictions) == y
    agree = proportion(np.asarray(res_a.predictions) == np.asarray(res_b.predictions))
    clean_drop = 100.0 * (res_a.clean_accuracy - res_b.clean_accuracy)
    robust_drop, robust_test, robust_change = None, None, None
    if res_a.robust_accuracy is not None and res_b.robust_accuracy is not None:
        robust_drop = 100.0 * (res_a.robust_accuracy - res_b.robust_accuracy)
        robust_test = mcnemar_exact(res_a.robust_correct, res_b.robust_correct).to_dict()
        robust_change = paired_change(res_a.robust_correct, res_b.robust_correct)
        if robust_drop < 0 and robust_test["p_value"] < 0.05:
            warnings.append("the optimized model looks significantly MORE robust than the original: "
                            "a red flag for gradient masking, not a win")
    failures = []
    if opts.max_drop_clean is not None and clean_drop > opts.max_drop_clean:
        failures.append(f"clean accuracy dropped {clean_drop:.2f} pp > {opts.max_drop_clean:g} pp")
    if opts.max_drop_robust is not None:
        if robust_drop is not None and robust_drop > opts.max_drop_robust:
            failures.append(f"robust accuracy dropped {robust_drop:.2f} pp > {opts.max_drop_robust:g} pp")
    attacks = []
    for name in opts.attacks:
        attacks.append(opts.settings(name).to_dict())
    if quantized_pair and any(a in WHITE_BOX for a in opts.attacks) and "square" not in opts.attacks:
        attacks.append(dict(opts.settings("square").to_dict(),
                            added="QDQ model: white-box gradients are straight-through (BPDA)"))
    return ValidationReport(
        original=res_a, optimized=res_b, agreement=agree.value, agreement_interval=[agree.low, agree.high],
        clean_drop_pp=clean_drop, robust_drop_pp=robust_drop,
        clean_difference_test=mcnemar_exact(ca, cb).to_dict(), robust_difference_test=robust_test,
        output_error=error_stats(logits_a, logits_b).to_dict(), attacks=attacks, data=data,
        gates={"max_drop_clean_pp": opts.max_drop_clean, "max_drop_robust_pp": opts.max_drop_robust,
               "passed": not failures, "failures": failures},
        warnings=warnings, versions=versions(), timings={}, robust_change=robust_change,
    )
