"""One model's evaluation as a file: the settings it depends on (its fingerprint), the per-sample
results, and the paired comparison of two such files (no CLI, no Ray).

An `EvaluationResult` is what `evaluate` writes: clean and robust correctness per sample, the
clean logits, the labels, and an `EvalSettings` fingerprint (model sha256, data, n, attacks and
their parameters, seed, shard size). Two results are compared (`compare_results`) only when
they cover the same samples under the same attack settings; a shard is merged into a result
(`gdws_onnx.eval.sharded`) only when its fingerprint is the result's. Either refusal is one
GDWSError naming every field that differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from gdws_onnx.errors import GDWSError, literal
from gdws_onnx.eval.validation import ModelResult, ValidateOptions, ValidationReport, paired_report
from gdws_onnx.files import write_text_atomic
from gdws_onnx.provenance import json_default

RESULT_KIND = "onnx-gdws evaluation"
RESULT_FORMAT = 1
# the fields two results of different models may differ in and still be compared sample by sample
MODEL_FIELDS = ("model_sha256", "gradient", "quantized_pair")


@dataclass(frozen=True)
class EvalSettings:
    """Everything a per-sample result depends on: the fingerprint of a work directory, of each of
    its shards and of a result file. `n` is the number of samples evaluated (resolved, never None);
    the shards are `shard_size` samples each, attacked with seeds derived from `seed`
    (`sharded.shard_seed`). Threads and the runner (one process or Ray) are not in it: they do
    not change a result."""

    model_sha256: str
    data: str
    n: int
    shard_size: int
    attacks: tuple[str, ...]
    eps: float
    steps: int
    step_size: float | None
    restarts: int
    random_start: bool
    queries: int
    seed: int
    gradient: str
    batch_size: int
    gradient_check_samples: int
    quantized_pair: bool = False  # Square also runs because the other model of a pair is QDQ

    @classmethod
    def of(cls, opts: ValidateOptions, model_sha256: str, data: str, n: int, shard_size: int,
           quantized_pair: bool = False) -> EvalSettings:
        """The fingerprint of evaluating one model (`model_sha256`) on the first `n` samples of
        `data` with `opts`, in shards of `shard_size`."""
        return cls(model_sha256=model_sha256, data=data, n=int(n), shard_size=int(shard_size),
                   attacks=tuple(opts.attacks), eps=float(opts.eps), steps=opts.steps, step_size=opts.step_size,
                   restarts=opts.restarts, random_start=opts.random_start, queries=opts.queries, seed=opts.seed,
                   gradient=opts.gradient, batch_size=opts.batch_size,
                   gradient_check_samples=opts.gradient_check_samples, quantized_pair=quantized_pair)

    @classmethod
    def from_dict(cls, d: dict) -> EvalSettings:
        """The settings a `to_dict` wrote; GDWSError naming the missing or unknown fields."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name != "quantized_pair"}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise GDWSError(f"settings without {missing} or with unknown {unknown}: not written by this version")
        return cls(**{**d, "attacks": tuple(d["attacks"])})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attacks"] = list(self.attacks)
        return d

    def options(self, seed: int | None = None, threads: int | None = None) -> ValidateOptions:
        """The ValidateOptions these settings evaluate with (`seed` instead of theirs: a shard's)."""
        return ValidateOptions(data=self.data, n=self.n, batch_size=self.batch_size, attacks=self.attacks,
                               eps=self.eps, steps=self.steps, step_size=self.step_size, restarts=self.restarts,
                               random_start=self.random_start, queries=self.queries,
                               seed=self.seed if seed is None else seed, gradient=self.gradient,
                               gradient_check_samples=self.gradient_check_samples, threads=threads)

    def differences(self, other: EvalSettings, ignore: tuple[str, ...] = ()) -> list[str]:
        """'field: mine vs theirs' for each field (but `ignore`) in which `other` differs."""
        return [f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}" for f in fields(self)
                if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]


def refuse_differences(what: str, here: EvalSettings, there: EvalSettings, ignore: tuple[str, ...] = ()) -> None:
    """Raise one GDWSError, `what` followed by every field that differs, unless none does."""
    diff = here.differences(there, ignore)
    if diff:
        raise GDWSError(f"{what}: {'; '.join(diff)}")


@dataclass
class EvaluationResult:
    """One model's clean and robust accuracy on `settings.n` samples, per sample (ModelResult),
    with the labels, the clean logits, how each shard ran and the software versions."""

    model: str  # the path it was given as
    settings: EvalSettings
    result: ModelResult
    labels: list[int]
    logits: list[list[float]]
    attacks: list[dict]  # AttackSettings.to_dict of each attack asked for (the global seed)
    data: dict  # spec, n, indices, shape
    shards: list[dict]  # per shard: index, start, stop, seed, seconds, gradient source
    warnings: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the run that finished it
    runner: str = "local"

    def to_dict(self) -> dict:
        return {"kind": RESULT_KIND, "format": RESULT_FORMAT, "model": self.model,
                "settings": self.settings.to_dict(), "result": asdict(self.result), "labels": self.labels,
                "logits": self.logits, "attacks": self.attacks, "data": self.data, "shards": self.shards,
                "warnings": self.warnings, "versions": self.versions, "seconds": self.seconds,
                "runner": self.runner}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> EvaluationResult:
        """A result `to_dict` wrote; GDWSError naming `source` when it is not one."""
        if d.get("kind") != RESULT_KIND or d.get("format") != RESULT_FORMAT:
            raise GDWSError(f"{source} is not an `evaluate` result (format {RESULT_FORMAT})")
        try:
            return cls(model=d["model"], settings=EvalSettings.from_dict(d["settings"]),
                       result=ModelResult(**d["result"]), labels=d["labels"], logits=d["logits"],
                       attacks=d["attacks"], data=d["data"], shards=d["shards"], warnings=d.get("warnings", []),
                       versions=d.get("versions", {}), seconds=d.get("seconds", 0.0),
                       runner=d.get("runner", "local"))
        except (KeyError, TypeError, GDWSError) as e:
            raise GDWSError(f"{source}: a malformed `evaluate` result ({e})") from None

    def write(self, path: str | os.PathLike) -> None:
        """Write the result as JSON to `path`, atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, default=json_default))


def is_result_file(path: str | os.PathLike) -> bool:
    """True for a path that names a result file (a .json) rather than a model."""
    return os.fspath(path).lower().endswith(".json")


def load_result(path: str | os.PathLike) -> EvaluationResult:
    """The EvaluationResult in the JSON file `path`; GDWSError when it cannot be read or is not one."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise GDWSError(f"cannot read the result {literal(path)}: {e}") from None
    if not isinstance(d, dict):
        raise GDWSError(f"{path} is not an `evaluate` result")
    return EvaluationResult.from_dict(d, os.fspath(path))


def compare_results(a: EvaluationResult, b: EvaluationResult, max_drop_clean: float | None = None,
                    max_drop_robust: float | None = None) -> ValidationReport:
    """`validate` of two finished results: a the original, b the optimized. They must cover the same
    samples (data, n, labels) under the same attack settings, seed and shard size; only the model,
    its gradient source and the QDQ pairing may differ (GDWSError naming the differences).
    Drops above `max_drop_clean` / `max_drop_robust` (percentage points) fail `report.gates`."""
    both_square = all("square" in r.result.robust_accuracy_by_attack for r in (a, b))
    # Square's iterations matter only where both ran it (else the unlike-attacks warning below says so)
    refuse_differences(f"{a.model} and {b.model} were not evaluated the same way", a.settings, b.settings,
                       MODEL_FIELDS + (() if both_square else ("queries",)))
    if a.labels != b.labels:
        raise GDWSError(f"{a.model} and {b.model} were evaluated on different samples (their labels differ)")
    opts = a.settings.options()
    opts.max_drop_clean, opts.max_drop_robust = max_drop_clean, max_drop_robust
    opts.check()
    warnings = [*a.warnings, *b.warnings]
    ran_a, ran_b = list(a.result.robust_accuracy_by_attack), list(b.result.robust_accuracy_by_attack)
    if sorted(ran_a) != sorted(ran_b):
        warnings.append(f"the two models faced different attacks ({', '.join(ran_a) or 'none'} vs "
                        f"{', '.join(ran_b) or 'none'}): the robust drop compares unlike attacks")
    y = np.asarray(a.labels, np.int64)
    data = {**a.data, "batch_size": a.settings.batch_size}
    report = paired_report(a.result, b.result, y, np.asarray(a.logits, np.float32), np.asarray(b.logits, np.float32),
                           opts, data, warnings, a.settings.quantized_pair or b.settings.quantized_pair)
    report.timings = {"original": a.seconds, "optimized": b.seconds}
    return report


def markdown_table(named: list[tuple[str, EvaluationResult]]) -> str:
    """A markdown table of several results on the same samples, the first the reference: clean %,
    robust % [95 % CI], the change from the reference in points (approximate paired 95 % interval),
    the samples lost and gained against it, and McNemar's p (docs/results.md's AutoAttack table)."""
    if len(named) < 2:
        raise GDWSError("a table needs a reference and at least one other result")
    ref = named[0][1]
    attacks = ", ".join(ref.settings.attacks) or "no attack"
    lines = [f"| model | clean % | {attacks} % [95 % CI] | change (pp) [95 % CI] | lost / gained | McNemar p |",
             "|---|---|---|---|---|---|"]
    for i, (name, run) in enumerate(named):
        r = run.result
        change, swaps, p = "-", "-", "-"
        if i:
            report = compare_results(ref, run)
            c, test = report.robust_change, report.robust_difference_test
            if c is not None:
                p = f"{test['p_value']:.3g}"
                change = f"{100 * c['change']:+.1f} [{100 * c['low']:+.1f} to {100 * c['high']:+.1f}]"
                swaps = f"{c['lost']} / {c['gained']}"
        robust = "-" if r.robust_accuracy is None else (
            f"{100 * r.robust_accuracy:.1f} [{100 * r.robust_accuracy_interval[0]:.1f}-"
            f"{100 * r.robust_accuracy_interval[1]:.1f}]")
        lines.append(f"| {name} | {100 * r.clean_accuracy:.1f} | {robust} | {change} | {swaps} | {p} |")
    lines.append(f"\n({ref.data.get('spec', ref.settings.data)}, samples 0-{ref.settings.n - 1}, "
                 f"eps {ref.settings.eps:g}, seed {ref.settings.seed})")
    return "\n".join(lines)
