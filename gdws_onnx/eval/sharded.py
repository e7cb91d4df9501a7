"""One model's evaluation in shards: the plan, each shard's seed, the work directory that makes it
resumable, and the merge (no CLI; Ray lives in `ray_runner.py`, which runs the same `run_shard`).

    evaluate("m.onnx", ValidateOptions(attacks=("pgd",), n=1000), shard_size=100, work_dir="m.shards")

The first `n` samples are cut into shards of `shard_size`. Shard i is attacked with the seed
`shard_seed(seed, i)`, derived from the global seed and its index alone, so the merged per-sample
result depends on (settings, seed, shard size) and never on the order in which shards ran, on
how many ran at once or on the runner (`LocalRunner` here, `RayRunner` on a cluster). It differs
from one unsharded `validate` run, whose attack draws one random stream for all samples.

A work directory holds `settings.json` (the `EvalSettings` fingerprint) and one
`shard_NNNNN.json` per finished shard, each written atomically when its shard finishes and
carrying the fingerprint too. With `resume`, only the missing shards run; a directory (or a shard
file) from other settings is refused with one GDWSError naming the fields that differ.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import onnx

from gdws_onnx.errors import GateFailed, GDWSError, OptionError, literal
from gdws_onnx.eval.results import EvalSettings, EvaluationResult, refuse_differences
from gdws_onnx.eval.validation import (
    ModelResult,
    ProgressFactory,
    ValidateOptions,
    check_attack_requirements,
    evaluate_model,
    load_samples,
)
from gdws_onnx.files import write_text_atomic
from gdws_onnx.graph.model_io import load_model
from gdws_onnx.provenance import json_default, versions

SETTINGS_FILE = "settings.json"
SHARD_PATTERN = "shard_{:05d}.json"
DEFAULT_SHARD_SIZE = 100


def shard_seed(seed: int, index: int) -> int:
    """The attack seed of shard `index` under the global `seed`: a 32-bit integer from numpy's
    SeedSequence(seed, spawn_key=(index,)), the same in every process and on every machine, and
    independent across shards."""
    if seed < 0 or index < 0:
        raise OptionError(f"{{0}} must be >= 0, got {seed}", "seed")
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0])


@dataclass(frozen=True)
class Shard:
    """Samples start .. stop-1, attacked with `seed`."""

    index: int
    start: int
    stop: int
    seed: int

    def __str__(self) -> str:
        return f"shard {self.index} (samples {self.start}-{self.stop - 1})"


def plan_shards(n: int, shard_size: int, seed: int) -> list[Shard]:
    """The shards of n samples, `shard_size` each (the last may be shorter), with their seeds."""
    if shard_size < 1:
        raise OptionError(f"{{0}} must be >= 1, got {shard_size}", "shard_size")
    return [Shard(i, start, min(start + shard_size, n), shard_seed(seed, i))
            for i, start in enumerate(range(0, n, shard_size))]


@dataclass
class ShardResult:
    """One shard's per-sample results and how it ran; `settings` is the fingerprint it ran under."""

    index: int
    start: int
    stop: int
    seed: int
    settings: EvalSettings
    labels: list[int]
    predictions: list[int]
    logits: list[list[float]]
    robust_correct: list[bool] | None
    robust_by_attack: dict[str, int]  # samples robust under each attack
    gradient_source: str | None
    gradient_check: dict | None
    softmax_cut: bool
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""  # host:pid it ran on

    @property
    def shard(self) -> Shard:
        return Shard(self.index, self.start, self.stop, self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["settings"] = self.settings.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShardResult:
        return cls(**{**d, "settings": EvalSettings.from_dict(d["settings"])})


@dataclass
class ShardFailure:
    """A shard that failed on bad input or a gate (not retried): the error's kind and message."""

    shard: Shard
    gate: bool  # GateFailed (exit 1) rather than GDWSError (exit 2)
    message: str

    def raise_it(self) -> None:
        """Raise the error again, naming its shard."""
        raise (GateFailed if self.gate else GDWSError)(f"{self.shard}: {self.message}")


def run_shard(model_blob: bytes, model_path: str, settings: EvalSettings, shard: Shard, x: np.ndarray,
              y: np.ndarray, threads: int | None = None) -> ShardResult | ShardFailure:
    """Evaluate one shard (x, y are its samples) in this process: one ONNX Runtime session and one
    gradient source with `threads` threads, every attack seeded with `shard.seed`. Bad input and
    gate failures come back as a ShardFailure (deterministic: not worth a retry); anything else
    raises (a runner may retry it)."""
    t0 = time.perf_counter()
    opts = settings.options(seed=shard.seed, threads=threads)
    warnings: list[str] = []
    try:
        model = onnx.load_from_string(model_blob)
        res, logits = evaluate_model(model, model_path, x, y, opts, warnings, os.path.basename(model_path), None,
                                     settings.quantized_pair)
    except GDWSError as e:
        return ShardFailure(shard, False, str(e))
    except GateFailed as e:
        return ShardFailure(shard, True, str(e))
    n = len(y)
    return ShardResult(
        index=shard.index, start=shard.start, stop=shard.stop, seed=shard.seed, settings=settings,
        labels=[int(v) for v in y], predictions=res.predictions,
        logits=np.asarray(logits, np.float32).tolist(), robust_correct=res.robust_correct,
        robust_by_attack={a: int(round(v * n)) for a, v in res.robust_accuracy_by_attack.items()},
        gradient_source=res.gradient_source, gradient_check=res.gradient_check, softmax_cut=res.softmax_cut,
        timings=res.timings, warnings=warnings, seconds=time.perf_counter() - t0,
        worker=f"{os.uname().nodename}:{os.getpid()}")


@dataclass
class ShardJob:
    """A shard and its samples, as a runner hands them to `run_shard`."""

    shard: Shard
    x: np.ndarray
    y: np.ndarray


class Runner(Protocol):
    """Runs shard jobs and calls `done` in this process with each ShardResult as it finishes.
    Raises GDWSError (GateFailed for a gate) naming the first shard that failed, after `done` has
    seen every shard that finished."""

    name: str

    def run(self, model_blob: bytes, model_path: str, settings: EvalSettings, jobs: list[ShardJob],
            done: Callable[[ShardResult], None]) -> None: ...


@dataclass
class LocalRunner:
    """Shards one after another in this process, `threads` threads each (None: ONNX Runtime's)."""

    threads: int | None = None
    name: str = "local"

    def run(self, model_blob: bytes, model_path: str, settings: EvalSettings, jobs: list[ShardJob],
            done: Callable[[ShardResult], None]) -> None:
        for job in jobs:
            try:
                out = run_shard(model_blob, model_path, settings, job.shard, job.x, job.y, self.threads)
            except Exception as e:  # a bug or a crash in one shard: say which
                raise GDWSError(f"{job.shard}: {type(e).__name__}: {e}") from e
            if isinstance(out, ShardFailure):
                out.raise_it()
            done(out)


class WorkDir:
    """A folder of finished shards under one fingerprint (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, settings: EvalSettings, resume: bool = False):
        """Open (or create) the work directory `path` for `settings`. GDWSError when it was written
        under other settings (naming the fields); OptionError naming `resume` when it holds
        finished shards and `resume` is False (nothing is overwritten)."""
        self.path, self.settings = os.fspath(path), settings
        settings_path = os.path.join(self.path, SETTINGS_FILE)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise GDWSError(f"cannot create the work directory {literal(self.path)}: {e}") from None
        if os.path.exists(settings_path):
            theirs = self._read(settings_path, EvalSettings.from_dict)
            refuse_differences(f"the work directory {self.path} holds a run with other settings "
                               "(this run vs the directory's)", settings, theirs)
        elif self.shard_files():
            raise GDWSError(f"the work directory {self.path} holds shards but no {SETTINGS_FILE}: not resumable")
        if self.shard_files() and not resume:
            raise OptionError(f"the work directory {literal(self.path)} already holds "
                              f"{len(self.shard_files())} finished shard(s): pass {{0}} to run only the "
                              "missing ones, or choose another directory", "resume=True")
        write_text_atomic(settings_path, json.dumps(settings.to_dict(), indent=1))

    @staticmethod
    def _read(path: str, parse):
        try:
            with open(path) as f:
                return parse(json.load(f))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise GDWSError(f"cannot read {literal(path)}: {e}") from None

    def shard_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.path, SHARD_PATTERN.replace("{:05d}", "[0-9]" * 5))))

    def finished(self, plan: list[Shard]) -> dict[int, ShardResult]:
        """The finished shards of `plan`, by index; GDWSError for a shard file of other settings or
        one that does not match the plan (another shard size or seed)."""
        by_index = {s.index: s for s in plan}
        found: dict[int, ShardResult] = {}
        for path in self.shard_files():
            r = self._read(path, ShardResult.from_dict)
            refuse_differences(f"{path} was written under other settings (the directory's vs the shard's)",
                               self.settings, r.settings)
            if by_index.get(r.index) != r.shard:
                raise GDWSError(f"{path} is {r.shard}, which is not in this run's plan")
            found[r.index] = r
        return found

    def save(self, result: ShardResult) -> None:
        """Write one finished shard, atomically."""
        write_text_atomic(os.path.join(self.path, SHARD_PATTERN.format(result.index)),
                          json.dumps(result.to_dict(), default=json_default))


def merge_shards(settings: EvalSettings, plan: list[Shard], results: dict[int, ShardResult],
                 model_path: str, data: dict, runner: str = "local", seconds: float = 0.0) -> EvaluationResult:
    """The shards' results as one, in sample order. Every shard of `plan` exactly once, each under
    `settings` and with its planned samples and seed (GDWSError otherwise: no sample is lost or
    counted twice)."""
    missing = [s.index for s in plan if s.index not in results]
    extra = sorted(set(results) - {s.index for s in plan})
    if missing or extra:
        raise GDWSError(f"cannot merge: shards {missing} missing, {extra} not in the plan")
    parts = [results[s.index] for s in plan]
    for s, r in zip(plan, parts):
        refuse_differences(f"cannot merge {s}: it ran under other settings", settings, r.settings)
        if r.shard != s or len(r.predictions) != s.stop - s.start:
            raise GDWSError(f"cannot merge {s}: it holds {r.shard} with {len(r.predictions)} samples")
    from gdws_onnx.core.stats import proportion

    labels = [v for r in parts for v in r.labels]
    predictions = [v for r in parts for v in r.predictions]
    clean = proportion(np.asarray(predictions) == np.asarray(labels))
    robust_correct, robust = None, None
    if all(r.robust_correct is not None for r in parts) and parts:
        robust_correct = [v for r in parts for v in r.robust_correct]
        robust = proportion(np.asarray(robust_correct, bool))
    attacks = list(dict.fromkeys(a for r in parts for a in r.robust_by_attack))
    by_attack = {a: sum(r.robust_by_attack.get(a, 0) for r in parts) / len(labels) for a in attacks}
    sources = sorted({r.gradient_source for r in parts if r.gradient_source})
    timings: dict[str, float] = {}
    for r in parts:
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    result = ModelResult(
        path=model_path, clean_accuracy=clean.value, clean_accuracy_interval=[clean.low, clean.high],
        robust_accuracy=None if robust is None else robust.value,
        robust_accuracy_interval=None if robust is None else [robust.low, robust.high],
        robust_accuracy_by_attack=by_attack, gradient_source=", ".join(sources) or None,
        gradient_check=parts[0].gradient_check if parts else None, softmax_cut=any(r.softmax_cut for r in parts),
        predictions=predictions, robust_correct=robust_correct, timings=timings)
    opts = settings.options()
    return EvaluationResult(
        model=model_path, settings=settings, result=result, labels=labels,
        logits=[row for r in parts for row in r.logits],
        attacks=[opts.settings(a).to_dict() for a in settings.attacks], data=data,
        shards=[{"index": r.index, "start": r.start, "stop": r.stop, "seed": r.seed, "seconds": r.seconds,
                 "gradient_source": r.gradient_source, "worker": r.worker} for r in parts],
        warnings=list(dict.fromkeys(w for r in parts for w in r.warnings)), versions=versions(),
        seconds=seconds, runner=runner)


def model_blob(model: onnx.ModelProto | str | os.PathLike) -> tuple[bytes, str]:
    """(serialized model, external data inlined; the path it is known by)."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), "<in-memory>"
    return load_model(os.fspath(model)).model.SerializeToString(), os.fspath(model)


def quantized_pair(*models: onnx.ModelProto | str | os.PathLike) -> bool:
    """True when one of `models` is QDQ (quantized activations): then both of a comparison also face
    Square, as `validate` does (its white-box gradients are straight-through)."""
    from gdws_onnx.eval.gradients.qdq import activation_quantizers

    return any(bool(activation_quantizers(m if isinstance(m, onnx.ModelProto) else load_model(os.fspath(m)).model))
               for m in models)


def evaluate(model: onnx.ModelProto | str | os.PathLike, options: ValidateOptions | None = None, *,
             shard_size: int = DEFAULT_SHARD_SIZE, work_dir: str | os.PathLike | None = None,
             resume: bool = False, runner: Runner | None = None, progress: ProgressFactory | None = None,
             quantized_pair: bool = False, x: np.ndarray | None = None,
             y: np.ndarray | None = None) -> EvaluationResult:
    """One model's clean and robust accuracy, per sample, evaluated in shards.

    Samples are `options.data`'s first `options.n` (or the arrays `x`, `y`), as in `validate`.
    Shards run on `runner` (default: LocalRunner with `options.threads`); each finished one is
    saved in `work_dir` (when given) at once, so an interrupted run loses only its running
    shards; `resume` runs only the shards the directory lacks. `progress(description, total)`
    gives one bar over the shards. `quantized_pair`: Square also runs (the other model of a
    comparison is QDQ). GDWSError on bad input or a refused work directory; a shard's error
    names the shard."""
    t0 = time.perf_counter()
    opts = options or ValidateOptions()
    opts.check()
    check_attack_requirements(opts.attacks, opts.gradient)
    blob, path = model_blob(model)
    xs, ys, data_name, indices = load_samples(opts, x, y)
    settings = EvalSettings.of(opts, hashlib.sha256(blob).hexdigest(), data_name, len(xs), shard_size,
                               quantized_pair)
    plan = plan_shards(len(xs), shard_size, opts.seed)
    done: dict[int, ShardResult] = {}
    store = None
    if work_dir is not None:
        store = WorkDir(work_dir, settings, resume)
        done = store.finished(plan) if resume else {}
    runner = runner or LocalRunner(opts.threads)
    advance = progress(f"{os.path.basename(path)}", len(plan)) if progress else None
    if advance and done:
        advance(len(done))

    def finished(r: ShardResult) -> None:
        if r.index in done:  # a runner must not deliver a shard twice; keep the first
            return
        if store is not None:
            store.save(r)
        done[r.index] = r
        if advance:
            advance(1)

    jobs = [ShardJob(s, xs[s.start:s.stop], ys[s.start:s.stop]) for s in plan if s.index not in done]
    if jobs:
        runner.run(blob, path, settings, jobs, finished)
    data = {"spec": data_name, "n": int(len(xs)), "indices": [int(i) for i in indices],
            "shape": list(xs.shape[1:])}
    return merge_shards(settings, plan, done, path, data, runner.name, time.perf_counter() - t0)
