"""Noise-gain sensitivity weights alpha_{l,c} from data (GDWS paper eq. 8, after Sakr et al. 2017).

For a sample with logits z, top class t and margins d_j = z_t - z_j (j != t), a small random
perturbation Delta of the block W_{l,c} (input channel c of conv l, n = (M/groups) K elements,
isotropic, ||Delta||_F^2 = e) moves d_j by <grad_{W_{l,c}} d_j, Delta>, whose variance is
||grad_{W_{l,c}} d_j||_F^2 e / n; by Chebyshev (symmetric) P(d_j changes sign) <= var / (2 d_j^2).
Summed over j and layers, averaged over samples:

    P(top-1 changes) <~ sum_l sum_c alpha_{l,c} e_{l,c},
    alpha_{l,c} = mean_i sum_{j != t_i} ||d d_j / d W_{l,c}||_F^2 / (2 d_j^2 n_{l}),

n_l = (M/groups) K, which is the paper's M k^2 for an ungrouped conv. Gradients come from the
torch replica of the ONNX graph in eval semantics (BatchNormalization on running statistics,
Dropout off), so a sample's alphas do not depend on the other samples of its batch; gradients
are taken by torch.autograd.grad on a fresh graph per batch, so nothing accumulates across
batches (the reference script runs BN in training mode and never zeroes its gradients).

The bound is loose: 1/d_j^2 is heavy-tailed, so near-ties dominate the average (the summary's
top1pct_share); on tests/validate_helpers.fm_cnn it predicts ~190 where 5% of top-1s change.

Per-sample gradients: with eval semantics sample i's output depends on sample i's activations
only, so one backward of sum_i d_{j_i}(x_i) to the conv *outputs* gives every sample's own
dL/dy_i (M x P), and its weight gradient is dL/dy_i X_i^T with X_i the im2col patches (C K x P)
of its input: one batched matmul per layer, no per-sample backward. One backward per competitor
rank r (sample i's r-th non-top class), classes - 1 in all. No CLI here.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from gdws_onnx.eval.attacks import AttackSettings, check_budget, project, random_start
from gdws_onnx.graph.convs import ConvSite, find_convs
from gdws_onnx.data import DataError, Dataset, load_dataset
from gdws_onnx.errors import GDWSError, OptionError, literal
from gdws_onnx.files import atomic_write, write_json_atomic
from gdws_onnx.eval.gradients.classifier import OrtClassifier
from gdws_onnx.eval.gradients.prepare import input_shape
from gdws_onnx.eval.gradients.sources import make_source
from gdws_onnx.eval.gradients.torch_replica import TorchReplica
from gdws_onnx.provenance import json_default

DEFAULT_MIN_MARGIN = 1e-3
Progress = Callable[[int], None]


@dataclass(frozen=True)
class LayerInfo:
    """One conv whose alphas were computed."""

    name: str
    in_channels: int
    out_channels: int
    groups: int
    kernel_shape: tuple[int, ...]
    block_size: int  # n = (M / groups) * K: elements of one W_{l,c}

    @property
    def kernel_size(self) -> int:
        return int(np.prod(self.kernel_shape, dtype=np.int64))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_shape"] = list(self.kernel_shape)
        return d


@dataclass
class SensitivityResult:
    """Per-conv noise-gain weights and how they were obtained.

    alphas[name]: float64 (in_channels,), alpha_{l,c} >= 0 as in the module docstring.
    skipped_terms: (sample, j) pairs left out because d_j < min_margin (near-ties).
    skipped_convs: conv name -> why it has no alphas (weight computed at run time)."""

    alphas: dict[str, np.ndarray]
    layers: list[LayerInfo]
    samples: int
    classes: int
    skipped_terms: int
    skipped_convs: dict[str, str] = field(default_factory=dict)
    # per conv: each sample's share of sum_c alpha_{l,c} * N (how heavy the near-tie tail is)
    sample_mass: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    attack: dict | None = None  # attack settings and its outcome, when inputs were perturbed
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> list[dict]:
        """Per layer: mean alpha, max / min channel alpha (inf when a channel has alpha 0), and
        the share of sum_c alpha_{l,c} that the top 1% of samples contribute (1/d_j^2 makes
        near-ties dominate: a share near 1 means a few samples decide the weights)."""
        rows = []
        for info in self.layers:
            a = self.alphas[info.name]
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            mass = np.sort(self.sample_mass.get(info.name, np.zeros(0)))[::-1]
            top = max(1, int(np.ceil(0.01 * mass.size)))
            rows.append({"name": info.name, "mean": float(a.mean()) if a.size else 0.0,
                         "max": hi, "min": lo,
                         "max_min_ratio": hi / lo if lo > 0 else (float("inf") if hi > 0 else 1.0),
                         "top1pct_share": float(mass[:top].sum() / mass.sum()) if mass.sum() > 0 else 0.0})
        return rows

    def metadata(self) -> dict:
        """JSON-able description (everything but the arrays)."""
        return {"format": "onnx-gdws noise-gain alphas v1",
                "formula": "alpha_{l,c} = mean_i sum_{j != t_i} ||d d_j / d W_{l,c}||_F^2 / (2 d_j^2 (M/groups) K)",
                "samples": self.samples, "classes": self.classes, "skipped_terms": self.skipped_terms,
                "skipped_convs": self.skipped_convs, "settings": self.settings, "attack": self.attack,
                "timings": self.timings, "layers": [i.to_dict() for i in self.layers],
                "summary": [{k: (v if not isinstance(v, float) or np.isfinite(v) else None)
                             for k, v in row.items()} for row in self.summary()]}


class _CapturingReplica(TorchReplica):
    """TorchReplica that keeps, for the chosen convs, the (padded) input and the output tensor,
    so per-sample weight gradients follow from d/d output by one batched product."""

    def __init__(self, model: onnx.ModelProto, dtype: str, names: set[str]):
        super().__init__(model, dtype=dtype)
        self.names = names
        self.captured: dict = {}

    def run(self, x) -> tuple:
        """(logits, {conv name: (padded input, output)}) for a batch x."""
        self.captured = {}
        try:
            return self(x), self.captured
        finally:
            self.captured = {}

    def _conv(self, node, ins, a):
        y = super()._conv(node, ins, a)
        name = node.name or node.output[0]
        if name in self.names:
            w, x = ins[1], ins[0]
            n = w.dim() - 2
            k = list(a.get("kernel_shape", w.shape[2:]))
            s = list(a.get("strides", [1] * n))
            d = list(a.get("dilations", [1] * n))
            pads = self._spatial_pads(x, a, k, s, d)
            self.captured[name] = (_patches(x.detach(), pads, k, s, d), y)
        return y


def _patches(x, pads: list[int], k: list[int], s: list[int], d: list[int]):
    """im2col for any number of spatial dims: (N, C, *sp) -> (N, C * K, P), rows in the order of a
    conv weight's (C, *kernel) flattening, P = output pixels (row-major)."""
    import torch.nn.functional as F

    n = len(k)
    if any(pads):
        lo, hi = pads[:n], pads[n:]
        x = F.pad(x, [p for i in reversed(range(n)) for p in (lo[i], hi[i])])
    for i in range(n):  # appends one window axis per spatial dim
        x = x.unfold(2 + i, (k[i] - 1) * d[i] + 1, s[i])
        if d[i] > 1:
            x = x[..., ::d[i]]
    nb, c = x.shape[:2]
    out_sp = x.shape[2:2 + n]
    perm = [0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n)]
    return x.permute(*perm).reshape(nb, c * int(np.prod(k)), int(np.prod(out_sp)))


def load_samples(spec: str, n: int | None) -> Dataset:
    """The first n samples of a data spec (gdws_onnx.data.load_dataset); GDWSError when unusable."""
    if n is not None and n < 1:
        raise OptionError(f"{{0}} must be >= 1, got {n}", "n")
    try:
        return load_dataset(spec, n=n)
    except (DataError, ValueError, OSError) as e:
        raise OptionError(f"{{0}} {literal(spec)}: {literal(e)}", "data") from None


def _check_samples(model: onnx.ModelProto, x: np.ndarray) -> None:
    dims, _ = input_shape(model)
    if x.ndim != len(dims) or len(x) == 0:
        raise GDWSError(f"the model input has dims {dims}; the data gives an array of shape {list(x.shape)}")
    bad = [(d, g) for d, g in zip(dims[1:], x.shape[1:]) if isinstance(d, int) and d != g]
    if bad:
        raise GDWSError(f"the model input has dims {dims}; the data samples have shape {list(x.shape[1:])}")


def alpha_sites(model: onnx.ModelProto, x: np.ndarray) -> tuple[list[ConvSite], dict[str, str]]:
    """The convs alphas are computed for (constant weights) and the skipped ones' weight sources,
    after checking the samples fit the model's single input."""
    _check_samples(model, x)
    sites = find_convs(model)
    skipped = {s.name: s.weight_source for s in sites if s.weight is None}
    sites = [s for s in sites if s.weight is not None]
    if not sites:
        raise GDWSError("the model has no Conv with a constant weight: no alphas to compute")
    return sites, skipped


def noise_gain_alphas(model: onnx.ModelProto, x: np.ndarray, *, y: np.ndarray | None = None,
                      batch_size: int = 64, attack: AttackSettings | None = None,
                      min_margin: float = DEFAULT_MIN_MARGIN, dtype: str = "float32",
                      threads: int | None = None, progress: Progress | None = None) -> SensitivityResult:
    """Noise-gain alphas of every conv with a constant weight, averaged over the samples `x`.

    x: (N, ...) inputs as the model takes them. With `attack` (PGD only), alphas are computed at
    `pgd_inputs` (white-box PGD with the same torch replica's gradients, every sample moved)
    against `y`, or against the model's own clean top-1 when y is None.
    Terms with d_j < min_margin (near-ties, where the first-order bound says nothing and 1/d_j^2
    would let one sample dominate) are skipped and counted. dtype: "float32" or "float64".
    threads: torch intra-op threads for this call (restored afterwards) and ONNX Runtime's for
    the attack; None leaves torch's setting (on a loaded machine, 1 can be many times faster)."""
    try:
        import torch
    except ImportError:
        raise GDWSError("sensitivity needs torch (pip install torch==2.13.0, CPU wheel)") from None

    t_total = time.perf_counter()
    if batch_size < 1:
        raise GDWSError(f"batch size must be >= 1, got {batch_size}")
    if not min_margin >= 0:
        raise GDWSError(f"min margin must be >= 0, got {min_margin}")
    if dtype not in ("float32", "float64"):
        raise GDWSError(f"dtype must be float32 or float64, got {dtype!r}")
    x = np.ascontiguousarray(x, np.float32)
    sites, skipped = alpha_sites(model, x)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        result = _alphas(model, x, y, sites, batch_size=batch_size, attack=attack, min_margin=min_margin,
                         dtype=dtype, threads=threads, progress=progress)
    finally:
        torch.set_num_threads(old_threads)
    result.skipped_convs = skipped
    result.timings["total"] = time.perf_counter() - t_total
    return result


def _alphas(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray | None, sites: list, *, batch_size: int,
            attack: AttackSettings | None, min_margin: float, dtype: str, threads: int | None,
            progress: Progress | None) -> SensitivityResult:
    """noise_gain_alphas after its checks, under the chosen torch thread count."""
    import torch

    replica = _CapturingReplica(model, dtype, {site.name for site in sites})
    timings: dict[str, float] = {}
    attack_info = None
    if attack is not None:
        t0 = time.perf_counter()
        x, attack_info = pgd_inputs(model, x, y, attack, batch_size, threads)
        timings["attack"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tdtype = getattr(torch, dtype)
    infos = [LayerInfo(s.name, s.in_channels, s.out_channels, s.group, s.kernel_shape,
                       (s.out_channels // s.group) * s.kernel_size) for s in sites]
    sums = {i.name: np.zeros(i.in_channels) for i in infos}
    mass = {i.name: np.zeros(len(x)) for i in infos}
    skipped_terms, classes = 0, None
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        k, c = _accumulate(replica, torch, tdtype, infos, xb, min_margin, sums,
                           {name: m[s:s + batch_size] for name, m in mass.items()})
        skipped_terms += k
        if classes is not None and c != classes:
            raise GDWSError("the model's number of classes changed between batches")
        classes = c
        if progress:
            progress(len(xb))
    timings["gradients"] = time.perf_counter() - t0
    n = len(x)
    return SensitivityResult(
        alphas={i.name: sums[i.name] / n for i in infos}, layers=infos, samples=n, classes=int(classes),
        skipped_terms=int(skipped_terms), sample_mass=mass,
        settings={"batch_size": batch_size, "min_margin": min_margin, "dtype": dtype, "threads": threads,
                  "eval_semantics": True, "gradient_source": "torch replica"},
        attack=attack_info, timings=timings)


def _accumulate(replica: _CapturingReplica, torch, tdtype, infos: list[LayerInfo], xb: np.ndarray,
                min_margin: float, sums: dict[str, np.ndarray], mass: dict[str, np.ndarray]) -> tuple[int, int]:
    """Add one batch's sum_i sum_j ||grad||^2 / (2 d_j^2 n) to `sums` (per channel) and each
    sample's sum over channels to `mass` (views of this batch's rows). Returns (skipped, classes)."""
    n = len(xb)
    with torch.enable_grad():
        xt = torch.from_numpy(xb).to(tdtype).requires_grad_(True)  # so conv outputs are in the graph
        z, captured = replica.run(xt)
    if z.dim() != 2 or z.shape[0] != n:
        raise GDWSError(f"the model output has shape {list(z.shape)}; alphas need (N, classes) logits")
    classes = int(z.shape[1])
    if classes < 2:
        raise GDWSError("alphas need a classifier with at least 2 outputs")
    missing = [i.name for i in infos if i.name not in captured]
    if missing:
        raise GDWSError(f"conv(s) {missing[:3]} were not evaluated by the torch replica")
    top = z.detach().argmax(1)
    idx = torch.arange(classes).expand(n, classes)
    others = idx[idx != top[:, None]].reshape(n, classes - 1)
    z_top = z.gather(1, top[:, None])[:, 0]
    outs = [captured[i.name][1] for i in infos]
    skipped = 0
    for r in range(classes - 1):
        d = z_top - z.gather(1, others[:, r:r + 1])[:, 0]
        grads = torch.autograd.grad(d.sum(), outs, retain_graph=r < classes - 2, allow_unused=True)
        dv = d.detach().double().numpy()
        keep = dv >= max(min_margin, np.finfo(np.float64).tiny)
        skipped += int(np.count_nonzero(~keep))
        weight = np.where(keep, 1.0 / (2.0 * np.where(keep, dv, 1.0) ** 2), 0.0)
        for info, gy in zip(infos, grads):
            if gy is None:  # the conv does not reach the output
                continue
            sq = _channel_sq_norms(gy, captured[info.name][0], info.groups, info.kernel_size)  # (n, C)
            contrib = weight[:, None] * sq.double().numpy() / info.block_size  # (n, C)
            sums[info.name] += contrib.sum(0)
            mass[info.name] += contrib.sum(1)
    return skipped, classes


def _channel_sq_norms(gy, patches, groups: int, kernel_size: int):
    """Per-sample ||dL/dW_{i,c}||_F^2, shape (N, C), from dL/dy (N, M, *out) and im2col patches
    (N, C K, P): G_i = dL/dy_i X_i^T per group. Channel c = j (C/g) + c_local of group j owns
    rows j M/g ... (j+1) M/g - 1 of weight column c_local (the order of decompose.channel_blocks)."""
    n, m = gy.shape[:2]
    p = patches.shape[2]
    mg = m // groups
    g = gy.reshape(n, groups, mg, p) @ patches.reshape(n, groups, -1, p).transpose(2, 3)  # (N, g, M/g, C/g K)
    return g.reshape(n, groups, mg, -1, kernel_size).pow(2).sum(dim=(2, 4)).reshape(n, -1)


def pgd_inputs(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray | None, settings: AttackSettings,
               batch_size: int = 64, threads: int | None = None, gradient: str = "torch"
               ) -> tuple[np.ndarray, dict]:
    """The last iterates of L-inf PGD on cross-entropy (as `attacks.pgd` steps them: random start,
    sign steps of settings.alpha, projection on the eps-ball and [0, 1]) for *every* sample, with
    gradients of the torch replica; against `y`, or the model's clean top-1 when y is None.

    Unlike `attacks.pgd`, which keeps the clean input of every sample it does not break, this
    returns where the attack went (the reference computes its alphas at such inputs). gradient:
    the gradient source ("torch", or "onnx-ad" without torch). Returns (inputs, info: settings,
    labels used, ONNX Runtime accuracy on them, max perturbation)."""
    if settings.name != "pgd":
        raise OptionError(f"sensitivity supports {{0}} pgd or none, got {literal(repr(settings.name))}", "attack")
    if settings.eps < 0 or settings.steps < 0:
        raise OptionError("{0} and {1} must be >= 0", "eps", "steps")
    t0 = time.perf_counter()
    clf = OrtClassifier(model, batch_size=max(batch_size, 64), threads=threads)
    source = make_source(model, gradient, batch_size=batch_size, threads=threads)
    labels = "given"
    if y is None:
        y = clf(x).argmax(1)
        labels = "model top-1"
    y = np.asarray(y, np.int64)
    if y.shape != (len(x),):
        raise GDWSError(f"{len(y)} labels for {len(x)} samples")
    eps, step = float(settings.eps), np.float32(settings.alpha)
    rng = np.random.default_rng(settings.seed)
    out = np.empty_like(x)
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        xa = random_start(xb, eps, "linf", rng) if settings.random_start else xb.copy()
        for _ in range(settings.steps):
            _, g = source.ce_grad(xa, yb)
            xa = project(xb, xa + step * np.sign(g).astype(np.float32), eps, "linf")
        out[s:s + batch_size] = xa
    info = {**settings.to_dict(), "labels": labels, "iterates": "last (every sample)", "gradient": gradient,
            "accuracy_on_inputs": float(np.mean(clf(out).argmax(1) == y)),
            "max_perturbation": check_budget(x, out, eps, "linf"), "seconds": time.perf_counter() - t0}
    return out, info


def save_alphas(result: SensitivityResult, path: str) -> str:
    """Write result.alphas as an .npz keyed by conv name (what `optimize --alphas` reads) and the
    metadata as JSON beside it (`PATH.meta.json`), both atomically. Returns the metadata path."""
    if not path.endswith(".npz"):
        raise GDWSError(f"the alphas file must end in .npz, got {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GDWSError(f"output folder does not exist: {folder}")
    meta_path = path + ".meta.json"
    with atomic_write(path, "wb") as f:  # renamed last, after the metadata
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            for name, a in result.alphas.items():  # what np.savez writes, for any key
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(a, np.float64), allow_pickle=False)
        f.flush()
        with np.load(f.name) as z:  # conv names must survive the zip member names
            if sorted(z.files) != sorted(result.alphas):
                raise GDWSError("some conv names cannot be stored as .npz keys: "
                                f"{sorted(set(result.alphas) - set(z.files))[:3]}")
        write_json_atomic(meta_path, result.metadata(), indent=2, default=json_default)
    return meta_path
