"""Adversarial attacks on an ONNX classifier whose decisions are taken on ONNX Runtime outputs.

* `pgd`: PGD L-inf / L2 (numpy) driven by a `GradientSource` (gdws_onnx.eval.gradients.protocol).
* `square_linf`: the Square attack (Andriushchenko et al. 2020, L-inf, margin loss) using only
  ONNX Runtime forward passes: the gradient-free check and the fallback for unsupported ops.
* `autoattack`: torchattacks' AutoAttack 'standard' over the ORT bridge (optional extra).

Every attack returns an `AttackResult`: adversarial inputs inside the eps-ball and [0, 1], and a
per-sample `robust` mask decided by re-scoring those inputs in ONNX Runtime. No CLI here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.gradients.protocol import GradientSource

Forward = Callable[[np.ndarray], np.ndarray]  # x (N, ...) float32 -> logits (N, classes)
Progress = Callable[[int], None]  # advance by k units
ATTACKS = ("pgd", "pgd-l2", "square", "autoattack")
BUDGET_SLACK = 1e-6  # float32 rounding of x +- eps


@dataclass
class AttackSettings:
    """One attack and its parameters (step_size None = eps / 4)."""

    name: str = "pgd"
    eps: float = 0.1
    steps: int = 20
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    queries: int = 1000  # square
    p_init: float = 0.05  # square
    seed: int = 0

    @property
    def norm(self) -> str:
        return "l2" if self.name == "pgd-l2" else "linf"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["norm"] = self.norm
        if self.name.startswith("pgd"):
            d["step_size"] = self.alpha
            for k in ("queries", "p_init"):
                d.pop(k)
        elif self.name == "square":
            for k in ("steps", "step_size", "restarts", "random_start"):
                d.pop(k)
        else:
            for k in ("steps", "step_size", "restarts", "random_start", "queries", "p_init"):
                d.pop(k)
            d.update(version="standard", components=["apgd-ce", "apgd-t", "fab-t", "square"],
                     iterations=AUTOATTACK_ITERATIONS, square_queries=5000)
        return d

    @property
    def alpha(self) -> float:
        return self.eps / 4 if self.step_size is None else self.step_size


@dataclass
class AttackResult:
    x_adv: np.ndarray
    robust: np.ndarray  # bool per sample: ORT still classifies x_adv correctly
    seconds: float
    model_seconds: float  # inside forward/backward of the model (ORT or gradient source)
    max_perturbation: float  # in the attack's norm


def perturbation_norm(x: np.ndarray, x_adv: np.ndarray, norm: str) -> np.ndarray:
    d = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
    return np.abs(d).max(1, initial=0.0) if norm == "linf" else np.linalg.norm(d, axis=1)


def check_budget(x: np.ndarray, x_adv: np.ndarray, eps: float, norm: str) -> float:
    """Raise GDWSError unless every x_adv is in [0, 1] and within eps of x; return the max norm."""
    if not np.all(np.isfinite(x_adv)):
        raise GDWSError("attack produced non-finite inputs")
    if x_adv.min(initial=0.0) < 0.0 or x_adv.max(initial=0.0) > 1.0:
        raise GDWSError("attack left the [0, 1] input box")
    m = perturbation_norm(x, x_adv, norm)
    worst = float(m.max(initial=0.0))
    if worst > eps + BUDGET_SLACK * max(1.0, np.sqrt(x[0].size) if norm == "l2" else 1.0):
        raise GDWSError(f"attack perturbation {worst:.6g} exceeds eps {eps:g} ({norm})")
    return worst


def project(x: np.ndarray, x_adv: np.ndarray, eps: float, norm: str) -> np.ndarray:
    """x_adv moved into the eps-ball around x ("linf": clipped per pixel; "l2": shrunk radially, a
    hair inside so float32 rounding never leaves it) and then into the [0, 1] box, as float32."""
    if norm == "linf":
        x_adv = np.clip(x_adv, x - eps, x + eps)
    else:
        d = (x_adv - x).reshape(len(x), -1)
        n = np.linalg.norm(d.astype(np.float64), axis=1)
        factor = np.where(n > eps, eps / np.maximum(n, 1e-30), 1.0).astype(np.float32)
        # shrink a hair more so float32 rounding never leaves the ball
        factor = np.where(n > eps, factor * np.float32(1 - 1e-6), factor)
        x_adv = x + (d * factor[:, None]).reshape(x.shape)
    return np.clip(x_adv, 0.0, 1.0).astype(np.float32)


def random_start(x: np.ndarray, eps: float, norm: str, rng: np.random.Generator) -> np.ndarray:
    """A random point of the eps-ball around each sample of x ("linf": uniform per pixel; "l2":
    uniform in the ball), projected into [0, 1] (`project`); x itself (a copy) when eps is 0."""
    if eps == 0:
        return x.copy()
    if norm == "linf":
        delta = rng.uniform(-eps, eps, size=x.shape).astype(np.float32)
    else:
        d = rng.standard_normal(x.shape).reshape(len(x), -1)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        r = rng.random(len(x)) ** (1.0 / d.shape[1])
        delta = (d * (eps * r)[:, None]).reshape(x.shape).astype(np.float32)
    return project(x, x + delta, eps, norm)


def _timed(fn, acc: list):
    def wrapped(*a):
        t0 = time.perf_counter()
        out = fn(*a)
        acc[0] += time.perf_counter() - t0
        return out
    return wrapped


def pgd(forward: Forward, source: GradientSource, x: np.ndarray, y: np.ndarray, settings: AttackSettings,
        batch_size: int = 64, progress: Progress | None = None) -> AttackResult:
    """PGD (L-inf sign steps or L2 normalised steps) maximising cross-entropy from `source`.

    Only samples ORT classifies correctly are attacked. Per restart, each sample's candidate is
    the first iterate the source's logits call misclassified, else the last; candidates are
    re-scored with `forward` (ORT), and a sample is broken when ORT misclassifies a candidate.
    With eps = 0 the inputs are never moved, so robust equals clean correctness exactly."""
    t_start = time.perf_counter()
    model_t = [0.0]
    fwd = _timed(forward, model_t)
    ce_grad = _timed(source.ce_grad, model_t)
    x = np.ascontiguousarray(x, np.float32)
    eps, norm, alpha = float(settings.eps), settings.norm, float(settings.alpha)
    rng = np.random.default_rng(settings.seed)
    x_best = x.copy()
    robust = fwd(x).argmax(1) == y
    for r in range(settings.restarts):
        todo = np.flatnonzero(robust)
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            xb, yb = x[idx], y[idx]
            xa = random_start(xb, eps, norm, rng) if settings.random_start else xb.copy()
            found = np.zeros(len(idx), bool)
            cand = xa.copy()
            for _ in range(settings.steps):
                logits, g = ce_grad(xa, yb)
                wrong = (logits.argmax(1) != yb) & ~found
                cand[wrong] = xa[wrong]
                found |= wrong
                if norm == "linf":
                    xa = xa + np.float32(alpha) * np.sign(g).astype(np.float32)
                else:
                    gn = np.linalg.norm(g.reshape(len(g), -1), axis=1)
                    step = g / np.maximum(gn, 1e-12).reshape(-1, *([1] * (g.ndim - 1)))
                    xa = xa + np.float32(alpha) * step.astype(np.float32)
                xa = project(xb, xa, eps, norm)
            cand[~found] = xa[~found]
            broken = fwd(cand).argmax(1) != yb
            x_best[idx[broken]] = cand[broken]
            robust[idx[broken]] = False
            if progress:
                progress(len(idx))
    worst = check_budget(x, x_best, eps, norm)
    return AttackResult(x_best, robust, time.perf_counter() - t_start, model_t[0], worst)


def _p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Square-size schedule of Andriushchenko et al. (2020), rescaled to 10000 iterations."""
    it = int(it / n_iters * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    true = z[np.arange(len(y)), y]
    other = z.copy()
    other[np.arange(len(y)), y] = -np.inf
    return true - other.max(1)


def square_linf(forward: Forward, x: np.ndarray, y: np.ndarray, settings: AttackSettings,
                batch_size: int = 256, progress: Progress | None = None) -> AttackResult:
    """Square attack, L-inf (random search over eps-valued square patches, margin loss), using
    only `forward` (ONNX Runtime). `settings.queries` iterations after the stripe initialisation."""
    t_start = time.perf_counter()
    model_t = [0.0]
    fwd = _timed(forward, model_t)
    x = np.ascontiguousarray(x, np.float32)
    eps = float(settings.eps)
    rng = np.random.default_rng(settings.seed)
    x_best_all = x.copy()
    robust = fwd(x).argmax(1) == y
    if x.ndim != 4:
        raise GDWSError("the Square attack needs N x C x H x W inputs")
    n_iters = int(settings.queries)
    todo = np.flatnonzero(robust)
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        xb, yb = x[idx], y[idx]
        if eps == 0:
            if progress:
                progress(len(idx))
            continue
        n, c, h, w = xb.shape
        # vertical stripes of +-eps
        x_best = np.clip(xb + eps * rng.choice([-1.0, 1.0], size=(n, c, 1, w)).astype(np.float32), 0, 1)
        margin = _margin(fwd(x_best), yb)
        for it in range(n_iters):
            active = np.flatnonzero(margin > 0)
            if active.size == 0:
                break
            xc, xbc = xb[active], x_best[active]
            p = _p_selection(settings.p_init, it, n_iters)
            side = int(min(max(round(np.sqrt(p * h * w)), 1), h - 1 if h > 1 else 1))
            deltas = xbc - xc
            na = len(active)
            ch = rng.integers(0, h - side + 1, size=na)[:, None, None, None]
            cw = rng.integers(0, w - side + 1, size=na)[:, None, None, None]
            rows = np.arange(h)[None, None, :, None]
            cols = np.arange(w)[None, None, None, :]
            win = (rows >= ch) & (rows < ch + side) & (cols >= cw) & (cols < cw + side)  # (na,1,h,w)
            new = eps * rng.choice([-1.0, 1.0], size=(na, c, 1, 1)).astype(np.float32)
            for _ in range(10):  # redraw where the window would not change (as the reference does)
                changed = np.where(win, np.abs(np.clip(xc + new, 0, 1) - xbc), 0).reshape(na, -1).sum(1)
                same = changed < 1e-7
                if not same.any():
                    break
                new[same] = eps * rng.choice([-1.0, 1.0], size=(int(same.sum()), c, 1, 1))
            deltas = np.where(win, new, deltas)
            x_new = np.clip(xc + deltas, xc - eps, xc + eps)
            x_new = np.clip(x_new, 0, 1).astype(np.float32)
            m_new = _margin(fwd(x_new), yb[active])
            better = m_new < margin[active]
            margin[active[better]] = m_new[better]
            x_best[active[better]] = x_new[better]
        broken = fwd(x_best).argmax(1) != yb
        x_best_all[idx[broken]] = x_best[broken]
        robust[idx[broken]] = False
        if progress:
            progress(len(idx))
    worst = check_budget(x, x_best_all, eps, "linf")
    return AttackResult(x_best_all, robust, time.perf_counter() - t_start, model_t[0], worst)


def autoattack_available() -> bool:
    try:
        import torch  # noqa: F401
        import torchattacks  # noqa: F401
    except ImportError:
        return False
    return True


AUTOATTACK_ITERATIONS = 100  # APGD-CE, APGD-T, FAB-T (Croce & Hein 2020); Square: 5000 queries


def _autoattack_standard(torchattacks, module, eps: float, n_classes: int, seed: int):
    """AutoAttack 'standard' with the published settings. torchattacks 3.5.1's own
    AutoAttack(version='standard') leaves APGD/APGD-T/FAB at their default 10 iterations,
    a tenth of the original's, so the ensemble is assembled here."""
    it = AUTOATTACK_ITERATIONS
    return torchattacks.MultiAttack([
        torchattacks.APGD(module, norm="Linf", eps=eps, steps=it, n_restarts=1, loss="ce", seed=seed),
        torchattacks.APGDT(module, norm="Linf", eps=eps, steps=it, n_restarts=1, n_classes=n_classes, seed=seed),
        torchattacks.FAB(module, norm="Linf", eps=eps, steps=it, n_restarts=1, multi_targeted=True,
                         n_classes=n_classes, seed=seed),
        torchattacks.Square(module, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed),
    ])


def autoattack(forward: Forward, source: GradientSource, x: np.ndarray, y: np.ndarray,
               settings: AttackSettings, n_classes: int, batch_size: int = 64,
               progress: Progress | None = None) -> AttackResult:
    """torchattacks AutoAttack(version='standard', norm='Linf') over the ORT bridge (forward =
    ONNX Runtime, backward = `source.vjp`); results re-scored in ORT.

    Needs torch and `pip install --no-deps torchattacks==3.5.1`."""
    if not autoattack_available():
        raise GDWSError("AutoAttack needs torch and torchattacks: pip install torch==2.13.0 && "
                        "pip install --no-deps torchattacks==3.5.1")
    import torch
    import torchattacks

    from gdws_onnx.eval.gradients.classifier import ort_module

    t_start = time.perf_counter()
    model_t = [0.0]
    fwd = _timed(forward, model_t)

    class _Src:
        name = source.name
        vjp = staticmethod(_timed(source.vjp, model_t))

    module = ort_module(fwd, _Src())
    x = np.ascontiguousarray(x, np.float32)
    x_best = x.copy()
    robust = fwd(x).argmax(1) == y
    todo = np.flatnonzero(robust)
    if settings.eps > 0:
        atk = _autoattack_standard(torchattacks, module, float(settings.eps), n_classes, settings.seed)
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            xa = atk(torch.from_numpy(x[idx]), torch.from_numpy(y[idx])).detach().numpy().astype(np.float32)
            xa = np.clip(np.clip(xa, x[idx] - settings.eps, x[idx] + settings.eps), 0, 1)
            broken = fwd(xa).argmax(1) != y[idx]
            x_best[idx[broken]] = xa[broken]
            robust[idx[broken]] = False
            if progress:
                progress(len(idx))
    worst = check_budget(x, x_best, settings.eps, "linf")
    return AttackResult(x_best, robust, time.perf_counter() - t_start, model_t[0], worst)
