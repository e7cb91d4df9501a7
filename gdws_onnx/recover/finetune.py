"""`finetune`: a short robust fine-tune of a model's float initializers through the torch replica.

finetune_loaded(model, options):
  data -> split (holdout.py) -> score the input on the held-out split -> the chosen initializers
  as Parameters of an unfused `TorchReplica` (params.py) -> SGD (momentum 0.9, cosine decay) on
  adversarial examples (adversary.py; with a teacher, RSLAD-style distillation) -> the values
  written back into the same graph (`check_same_graph`) -> ONNX Runtime vs the replica (max
  relative error) -> score the output -> the gate: accepted unless its robust accuracy on the
  held-out split is below the input's (`allow_worse`) or ORT disagrees with the replica.
finetune_file(path, output, options) loads and runs that; finetune(...) also writes the output,
only when accepted (GateFailed otherwise). Deterministic for a seed and a thread count. With `checkpoint`, the loop's
state is saved every `checkpoint_every` steps (checkpoint.py) and `resume` goes on from it to the
same weights an uninterrupted run ends with.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx

from gdws_onnx.errors import GateFailed, GDWSError, OptionError, OptionText, literal
from gdws_onnx.eval.gradients.classifier import OrtClassifier
from gdws_onnx.eval.gradients.torch_replica import TorchReplica
from gdws_onnx.graph.model_io import (
    LoadedModel,
    check_output_path,
    load_model,
    save_model,
)
from gdws_onnx.recover import checkpoint, holdout
from gdws_onnx.recover.adversary import (
    LOSS_CHOICES,
    adversarial,
    clean_targets,
    parse_attack,
    training_loss,
)
from gdws_onnx.recover.params import (
    check_same_graph,
    make_trainable,
    trainable_names,
    write_back,
)

MOMENTUM = 0.9
RELATIVE_TOLERANCE = 1e-3  # ORT vs the replica on the written graph, max |a - b| / max |b|, beyond the input's:
INPUT_ERROR_FACTOR = 1.5  # limit = RELATIVE_TOLERANCE + INPUT_ERROR_FACTOR x the input's own error. A float
# graph's is ~1e-7; a QDQ graph's is ~0.02 (ORT's integer kernels requantize where the replica fake-quantizes)
CHECK_SAMPLES = 256  # held-out samples the ORT comparison runs on


@dataclass
class FinetuneOptions:
    """What to train, on what, and how. `steps` wins over `epochs` (default 1 epoch)."""

    data: str = "fashion-mnist:train"
    n: int | None = None  # the first n samples of data
    holdout: int | None = None  # held-out samples (the last ones); default 10 %, at most 1000
    attack: str = "fgsm-rs"  # none | fgsm-rs | pgd-K
    loss: str = "ce"  # without a teacher: ce | trades (adversary.LOSS_CHOICES); a teacher means RSLAD
    eps: float = 0.1
    train: str = "rewritten"  # rewritten | all
    epochs: float | None = None
    steps: int | None = None
    lr: float = 0.01
    batch: int = 128
    seed: int = 0
    threads: int | None = None
    eval_steps: int = 10  # PGD steps of the held-out score
    allow_worse: bool = False
    checkpoint: str | None = None  # write the loop's state here every checkpoint_every steps (checkpoint.py)
    checkpoint_every: int = 50
    resume: bool = False  # go on from `checkpoint` (a run that finds one without resume is refused)

    def check(self) -> None:
        """OptionError naming the first bad parameter."""
        parse_attack(self.attack, self.eps)
        if self.loss not in LOSS_CHOICES:
            raise OptionError(f"{{0}} must be one of {', '.join(LOSS_CHOICES)}, got {literal(self.loss)}", "loss")
        for name in ("n", "holdout", "steps", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError("{0} must be >= 1", name)
        if self.epochs is not None and self.epochs <= 0:
            raise OptionError("{0} must be > 0", "epochs")
        if self.batch < 1:
            raise OptionError("{0} must be >= 1", "batch")
        if self.eval_steps < 0:
            raise OptionError("{0} must be >= 0", "eval_steps")
        if self.checkpoint_every < 1:
            raise OptionError("{0} must be >= 1", "checkpoint_every")
        if self.resume and not self.checkpoint:
            raise OptionError("{0} needs {1}", "resume", "checkpoint")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionError("{0} must be a positive number", "lr")


@dataclass
class FinetuneProgress:
    """One training step done: loss of the step, robust accuracy on the training batches so far."""

    step: int
    total: int
    loss: float
    robust_accuracy: float


Progress = Callable[[FinetuneProgress], None]


@dataclass
class FinetuneReport:
    """What a fine-tune did and whether its result is accepted (`reason` says why not)."""

    options: dict
    data: str
    train_samples: int
    trained: list[str]
    parameters: int
    steps: int = 0
    samples_seen: int = 0
    seconds: float = 0.0
    loss_first: float | None = None  # mean training loss of the first (last) tenth of the steps
    loss_last: float | None = None
    train_robust_accuracy: float | None = None
    input: holdout.HoldoutScore | None = None
    output: holdout.HoldoutScore | None = None
    teacher: holdout.HoldoutScore | None = None  # the teacher on the same split: what recovery aims at
    max_relative_error: float | None = None
    input_relative_error: float | None = None  # the same for the input graph (what ORT's kernels differ by anyway)
    accepted: bool = False
    reason: str = ""
    losses: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input"] = self.input.to_dict() if self.input else None
        d["output"] = self.output.to_dict() if self.output else None
        d["teacher"] = self.teacher.to_dict() if self.teacher else None
        d["reason"] = str(self.reason)
        return d


@dataclass
class FinetuneResult:
    """The fine-tuned model (the same graph, new initializer values) and its report."""

    model: onnx.ModelProto
    report: FinetuneReport


@contextmanager
def torch_threads(torch, threads: int | None):
    """torch runs on `threads` intra-op threads inside the block, as before after it."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def teacher_probabilities(teacher: OrtClassifier | None, x: np.ndarray):
    """Softmax of the teacher's logits on x (float32), or None without a teacher."""
    if teacher is None:
        return None
    z = teacher(x).astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def check_teacher(teacher: OrtClassifier, replica: TorchReplica, x: np.ndarray) -> None:
    """GDWSError unless the teacher reads the same inputs and gives as many outputs as the model."""
    import torch

    holdout.check_data_shape(teacher.model, x, "the teacher")
    t = teacher(x[:2])
    with torch.no_grad():
        s = replica(torch.from_numpy(np.ascontiguousarray(x[:2])))
    if t.ndim != 2 or tuple(t.shape) != tuple(s.shape):
        raise GDWSError(f"the teacher's output has shape {list(t.shape)}, the model's {list(s.shape)}: "
                        "a teacher must be a classifier of the same classes")


def max_relative_error(model: onnx.ModelProto, replica: TorchReplica, x: np.ndarray, threads: int | None) -> float:
    """max |ORT(model) - replica| / max |replica| on x."""
    import torch

    ort_out = OrtClassifier(model, threads=threads)(x).astype(np.float64)
    with torch.no_grad():
        rep = replica(torch.from_numpy(np.ascontiguousarray(x))).double().numpy()
    return float(np.abs(ort_out - rep).max(initial=0.0) / max(np.abs(rep).max(initial=0.0), 1e-12))


def finetune_loaded(model: onnx.ModelProto, options: FinetuneOptions, teacher: onnx.ModelProto | None = None,
                    progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune `model`'s chosen float initializers (see the module docstring); the result is not
    written. GDWSError on bad input (unsupported operators, data of the wrong shape, a
    teacher of other outputs); the gate's verdict is in the report (accepted, reason)."""
    import torch

    options.check()
    refuse_interrupted(options)
    ident = checkpoint.identity(hashlib.sha256(model.SerializeToString()).hexdigest(),
                                {**asdict(options), "teacher": None if teacher is None else
                                 hashlib.sha256(teacher.SerializeToString()).hexdigest()})
    state = resume_state(options, ident)  # read (and checked against these settings) before any work
    attack = parse_attack(options.attack, options.eps)
    if teacher is not None and options.loss != "ce":
        raise OptionError("{0} trains on labels: with {1}, the teacher's soft outputs are the targets (RSLAD)",
                          "loss=" + options.loss, "teacher")
    names = trainable_names(model, options.train)
    ds = holdout.load_training_data(options.data, options.n)
    x_tr, y_tr, x_ho, y_ho = holdout.split(ds, options.holdout)
    replica = TorchReplica(model, fuse_gdws=False)  # GDWSError naming unsupported operators
    holdout.check_data_shape(replica.model, ds.x)
    t0 = time.perf_counter()
    with torch_threads(torch, options.threads):
        torch.manual_seed(options.seed)
        teacher_clf = None
        if teacher is not None:
            teacher_clf = OrtClassifier(teacher, threads=options.threads)
            check_teacher(teacher_clf, replica, x_tr)
        params = make_trainable(replica, names)
        input_error = max_relative_error(model, replica, x_ho[:CHECK_SAMPLES], options.threads)
        report = FinetuneReport(options=asdict(options), data=ds.name, train_samples=len(x_tr), trained=names,
                                parameters=int(sum(p.numel() for p in params)), input_relative_error=input_error)
        report.input = holdout.score(model, x_ho, y_ho, options.eps, options.eval_steps, options.seed,
                                     options.threads, options.batch)
        if teacher is not None:
            report.teacher = holdout.score(teacher, x_ho, y_ho, options.eps, options.eval_steps, options.seed,
                                           options.threads, options.batch)
        per_epoch = math.ceil(len(x_tr) / options.batch)
        total = options.steps or max(1, round((options.epochs or 1.0) * per_epoch))
        opt = torch.optim.SGD(params, lr=options.lr, momentum=MOMENTUM)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        rng = np.random.default_rng(options.seed)
        gen = torch.Generator().manual_seed(options.seed)
        order, pos, correct, seen = rng.permutation(len(x_tr)), 0, 0, 0
        first = 0
        if state is not None:  # go on exactly where the interrupted run stopped
            with torch.no_grad():
                for name, p in zip(names, params):
                    p.copy_(state.values[name])
            opt.load_state_dict(state.optimizer)
            sched.load_state_dict(state.schedule)
            rng.bit_generator.state = state.rng
            gen.set_state(state.torch_gen)
            order, pos, correct, seen, first = state.order, state.pos, state.correct, state.seen, state.step
            report.losses = list(state.losses)
        for step in range(first, total):
            if pos >= len(order):
                order, pos = rng.permutation(len(x_tr)), 0
            idx = np.sort(order[pos:pos + options.batch])
            pos += options.batch
            xb = torch.from_numpy(np.ascontiguousarray(x_tr[idx], np.float32))
            yb = torch.from_numpy(np.ascontiguousarray(y_tr[idx], np.int64))
            tp = teacher_probabilities(teacher_clf, x_tr[idx])
            tp = None if tp is None else torch.from_numpy(tp)
            xa = adversarial(replica, attack, xb, yb, clean_targets(replica, xb, tp, options.loss), gen)
            opt.zero_grad(set_to_none=True)
            loss, logits = training_loss(replica, xb, xa, yb, tp, options.loss)
            if not torch.isfinite(loss):
                report.losses.append(float("nan"))
                report.reason = f"the training loss diverged at step {step + 1} (a smaller learning rate may help)"
                break
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(idx)
            report.losses.append(float(loss.detach()))
            if progress:
                progress(FinetuneProgress(step + 1, total, report.losses[-1], correct / seen))
            if options.checkpoint and (step + 1) % options.checkpoint_every == 0 and step + 1 < total:
                checkpoint.save(options.checkpoint, ident, checkpoint.LoopState(
                    step + 1, order, pos, correct, seen, list(report.losses), rng.bit_generator.state,
                    gen.get_state(), {n: p.detach().clone() for n, p in zip(names, params)}, opt.state_dict(),
                    sched.state_dict()))
        report.steps, report.samples_seen = len(report.losses), seen
        tenth = max(1, len(report.losses) // 10)
        report.loss_first = float(np.mean(report.losses[:tenth])) if report.losses else None
        report.loss_last = float(np.mean(report.losses[-tenth:])) if report.losses else None
        report.train_robust_accuracy = correct / seen if seen else None
        values = {name: p.detach().numpy().copy() for name, p in zip(names, params)}
        out = write_back(model, values)
        check_same_graph(model, out)
        if not report.reason:
            report.max_relative_error = max_relative_error(out, replica, x_ho[:CHECK_SAMPLES], options.threads)
            report.output = holdout.score(out, x_ho, y_ho, options.eps, options.eval_steps, options.seed,
                                          options.threads, options.batch)
    report.seconds = time.perf_counter() - t0
    report.accepted, report.reason = verdict(report, options)
    return FinetuneResult(out, report)


def refuse_interrupted(options: FinetuneOptions) -> None:
    """A checkpoint found without `resume` is an interrupted run: OptionError before any work, so
    that it is neither overwritten nor ignored."""
    if options.checkpoint and os.path.exists(options.checkpoint) and not options.resume:
        raise OptionError(f"{literal(options.checkpoint)} is the checkpoint of an interrupted run: pass {{0}} to go "
                          "on from it, or delete it to start over", "resume")


def resume_state(options: FinetuneOptions, ident: dict) -> checkpoint.LoopState | None:
    """The checkpoint's loop state when resuming from one; None to start afresh."""
    if not (options.resume and options.checkpoint and os.path.exists(options.checkpoint)):
        return None
    return checkpoint.load(options.checkpoint, ident)


def verdict(report: FinetuneReport, options: FinetuneOptions) -> tuple[bool, str]:
    """(accepted, why not): ORT must agree with the replica on the written graph (within
    RELATIVE_TOLERANCE beyond INPUT_ERROR_FACTOR x what they differ by on the input graph), and the
    held-out robust accuracy must not fall below the input's unless `allow_worse`."""
    if report.reason:
        return False, report.reason
    limit = RELATIVE_TOLERANCE + INPUT_ERROR_FACTOR * (report.input_relative_error or 0.0)
    if report.max_relative_error is None or not report.max_relative_error <= limit:
        return False, (f"ONNX Runtime and the replica disagree on the written graph (max relative error "
                       f"{report.max_relative_error:.3g} > {limit:.3g}; the input's {report.input_relative_error:.3g})")
    a, b = report.input, report.output
    if b.robust_correct < a.robust_correct and not options.allow_worse:
        return False, OptionText(f"robust accuracy on the {b.n} held-out samples fell from "
                                 f"{100 * a.robust_accuracy:.2f}% to {100 * b.robust_accuracy:.2f}% "
                                 "(pass {0} to keep it anyway)", "allow_worse")
    return True, ""


def finetune_file(path: str, output: str, options: FinetuneOptions, teacher: str | None = None,
                  progress: Progress | None = None) -> tuple[LoadedModel, FinetuneResult]:
    """Load the model at `path` (and `teacher`), check that `output` may be written, fine-tune it
    (`finetune_loaded`) and remove the finished run's checkpoint; nothing is written."""
    loaded = load_model(path)
    check_output_path(output, path)
    teacher_model = load_model(teacher).model if teacher else None
    result = finetune_loaded(loaded.model, options, teacher_model, progress)
    if options.checkpoint and os.path.exists(options.checkpoint):  # the run finished: nothing to resume
        os.remove(options.checkpoint)
    return loaded, result


def finetune(path: str, output: str, options: FinetuneOptions, teacher: str | None = None,
             progress: Progress | None = None) -> FinetuneReport:
    """Fine-tune the model at `path` and write it to `output` (atomically) when accepted;
    GateFailed (nothing written) when not."""
    loaded, result = finetune_file(path, output, options, teacher, progress)
    if not result.report.accepted:
        raise GateFailed(str(result.report.reason))
    save_model(result.model, output, external_data=loaded.external_data)
    return result.report
