"""Gradient-free sensitivity weights alpha_{l,c} from forward passes on ONNX Runtime (no torch).

The noise-gain alphas of `sensitivity` (GDWS paper eq. 8) are, per conv l and input channel c,

    alpha_{l,c} = mean_i sum_{j != t_i} ||G_ij X_ic^T||_F^2 / (2 d_ij^2 n_l),

G_ij = d d_j / d y_l (M x P: the margin's gradient w.r.t. the conv's output), X_ic the K x P
patches of channel c of sample i's input to the conv, n_l = (M/groups) K. Without gradients:

* **input energy** E_{i,c} = ||x_c patch||^2 of sample i averaged over output positions (zero
  padding, strides, dilations and auto_pad included; exact, `patch_means`), and its mean over
  samples e_{l,c} = E ||x_c patch||^2.
* **output sensitivity** from noise injection: isotropic Gaussian noise Delta of per-element
  variance v = (sigma ||W_l||)^2 / size(W_l) on layer l's weight only gives, to first order,
  E[(Delta d_ij)^2] = v sum_c ||G_ij X_ic^T||^2. So

      t_{l,i} = sum_{j != t_i} E[(Delta d_ij)^2] / (2 d_ij^2 n_l v),   T_l = mean_i t_{l,i}

  makes T_l an unbiased estimate of sum_c alpha_{l,c}, the gradient alphas' layer total.
  Delta d is the antithetic central difference (d(W + Delta) - d(W - Delta)) / 2, which cancels
  the second-order term.
* **split over channels**, assuming ||G_ij X_ic^T||^2 proportional to E_{i,c} (it ignores how
  channel c's patches correlate with the output gradient: the approximation):
  "sample" (default) alpha_{l,c} = mean_i t_{l,i} E_{i,c} / sum_c' E_{i,c'}; "mean" alpha_{l,c} =
  e_{l,c} s_l with one s_l = T_l / sum_c e_{l,c} per layer. Both keep sum_c alpha_{l,c} = T_l.

Statistical stability (measured on the zoo VGG, 1000 training images, float32 ORT), with the
1/(2 d^2) weighting of eq. 8 (`weighting="noise-gain"`):
* the noise must be fresh per sample (`noise_batch` 1): one draw shared by a batch moves
  every sample's margins together, so a layer's T_l changed up to 5x between seeds with 4 shared
  draws; with independent per-sample draws it is an average of N independent estimates.
* 1/(2 d^2) is heavy-tailed (near-ties carry the mass, as for the gradient alphas), so the
  `tail` fraction of samples with the largest sum_j 1/(2 d_j^2) get `tail_draws` draws. With
  draws 2, tail 5 %, tail draws 64, layer totals moved 10-25 % between seeds and matched the
  gradient alphas' totals within that; per-channel ranks agreed with the gradient alphas at
  Spearman 0.8-0.99 (split "sample"; 0.3 to -0.2 on the deep layers with split "mean").
* `weighting="margin"` (the default) drops the 1/(2 d^2) factor: t_{l,i} is the mean squared
  margin change per unit noise energy. Stable with draws 2 alone (~5 % standard error), 2.5x
  cheaper (no tail draws), not dominated by a handful of near-tie samples, but in other units
  than the gradient alphas (no `--mismatch-budget` reading). On the zoo VGG at equal conv MACs
  (tools/alpha_table.py, 1000 test images, PGD-20) it allocated best of all the alphas tried:
  PGD-20 69.8 % at MACs / 1.5 and 51.2 % at / 2, against 65.1 / 50.4 % with the noise-gain
  weighting, 66.5 / 47.6 % with the gradient alphas and 57.3 / 23.4 % with alpha = 1.

Sections: numpy math (pads, patch statistics, margin terms); ORT probe (the model with chosen
tensors as extra outputs and conv weights as inputs); `forward_alphas`.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from gdws_onnx.eval.attacks import AttackSettings
from gdws_onnx.core.geometry import patch_means
from gdws_onnx.graph.convs import ConvSite, site_geometry
from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.gradients.prepare import logits_model
from gdws_onnx.runtime.session import ORT_TYPES, make_session, pad_batch, with_outputs
from gdws_onnx.alphas.noise_gain import DEFAULT_MIN_MARGIN, LayerInfo, SensitivityResult, alpha_sites, pgd_inputs

DEFAULT_NOISE = 1e-2  # relative weight noise sigma: ||Delta|| ~ sigma ||W_l||
DEFAULT_DRAWS = 2
DEFAULT_NOISE_BATCH = 1  # samples sharing one noise draw
DEFAULT_TAIL = 0.05  # fraction of samples (largest sum_j 1/(2 d_j^2)) that get tail_draws
DEFAULT_TAIL_DRAWS = 64
WEIGHTINGS = ("margin", "noise-gain")
DEFAULT_WEIGHTING = "margin"  # see the module docstring: stable, cheaper, and it allocated best
Progress = Callable[[int, int], None]  # (passes done since last call, total passes)


# ----------------------------------------------------------------------------- numpy math

def channel_energy(sq_total: np.ndarray, count: int, site: ConvSite) -> np.ndarray:
    """e_c = E ||x_c patch||^2 (C,), from the per-pixel sum over samples of x^2 (C, *spatial)."""
    return patch_means(sq_total, count, *site_geometry(site, sq_total.shape[1:])).sum(1)


def margin_terms(z: np.ndarray, z_plus: np.ndarray, z_minus: np.ndarray, weighting: str,
                 min_margin: float) -> tuple[np.ndarray, int]:
    """Per sample sum_{j != t} w_j (Delta d_j)^2, Delta d_j the central difference of the margins
    d_j = z_t - z_j (t = argmax z), w_j = 1 / (2 d_j^2) for noise-gain (0 when d_j < min_margin)
    or 1 for margin. Returns (terms (N,), number of skipped (sample, j) pairs)."""
    n, classes = z.shape
    rows = np.arange(n)
    t = z.argmax(1)
    off = np.ones((n, classes), bool)
    off[rows, t] = False
    d = z[rows, t][:, None] - z
    zp, zm = np.asarray(z_plus, np.float64), np.asarray(z_minus, np.float64)
    dd = ((zp[rows, t][:, None] - zp) - (zm[rows, t][:, None] - zm)) / 2
    if weighting == "margin":
        return np.where(off, dd ** 2, 0.0).sum(1), 0
    keep = off & (d >= max(min_margin, np.finfo(np.float64).tiny))
    w = np.where(keep, 1.0 / (2.0 * np.where(keep, d, 1.0) ** 2), 0.0)
    return (w * dd ** 2).sum(1), int(np.count_nonzero(off & ~keep))


# ----------------------------------------------------------------------------- ORT probe

class ActivationProbe:
    """ONNX Runtime runs of a single-input classifier (terminal Softmax cut) with chosen
    intermediate tensors as extra outputs and, optionally, chosen convs' weights fed as inputs
    (so one session serves every perturbed weight). Batches are padded for a fixed-batch input."""

    def __init__(self, model: onnx.ModelProto, tensors: list[str] = (), weight_sites: list[ConvSite] = (),
                 batch_size: int = 256, threads: int | None = None):
        m, _ = logits_model(model)
        g = m.graph
        inits = {t.name for t in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        self.input_name = inputs[0].name
        self.logits_name = g.output[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.fixed_batch = dims[0].dim_value if len(dims) and dims[0].dim_value > 0 else None
        self.batch_size = self.fixed_batch or batch_size
        used = {x for n in g.node for x in (n.name, *n.input, *n.output)} | inits | {v.name for v in g.input}
        self.weight_inputs: dict[str, str] = {}  # site name -> graph input name
        self.weights: dict[str, np.ndarray] = {}  # site name -> base weight
        nodes = {n.output[0]: n for n in g.node if n.op_type == "Conv"}
        for site in weight_sites:
            node = nodes[site.node.output[0]]
            name, k = f"{site.name}/probe_weight", 0
            while name in used:
                k += 1
                name = f"{site.name}/probe_weight_{k}"
            used.add(name)
            node.input[1] = name
            elem = helper.np_dtype_to_tensor_dtype(site.weight.dtype)
            g.input.append(helper.make_tensor_value_info(name, elem, list(site.weight.shape)))
            self.weight_inputs[site.name] = name
            self.weights[site.name] = np.ascontiguousarray(site.weight)
        self.tensors = list(dict.fromkeys(tensors))
        self.session = make_session(with_outputs(m, self.tensors), threads=threads)
        self.dtype = ORT_TYPES.get(self.session.get_inputs()[0].type, np.float32)
        self.seconds = 0.0
        self.passes = 0

    def run(self, x: np.ndarray, weights: dict[str, np.ndarray] | None = None,
            on_batch: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> np.ndarray:
        """Logits (N, classes) over all of x in batches; `weights` overrides base weights by site
        name; on_batch(start, {tensor: value}) sees each batch's requested tensors."""
        t0 = time.perf_counter()
        feeds_w = {self.weight_inputs[k]: v for k, v in self.weights.items()}
        for k, v in (weights or {}).items():
            feeds_w[self.weight_inputs[k]] = np.ascontiguousarray(v, self.weights[k].dtype)
        names = [self.logits_name] + [t for t in self.tensors if t != self.input_name]
        if on_batch is None:
            names = names[:1]
        outs = []
        x = np.asarray(x, self.dtype)
        for s in range(0, len(x), self.batch_size):
            chunk = x[s:s + self.batch_size]
            k = len(chunk)
            if self.fixed_batch:
                chunk = pad_batch(chunk, self.fixed_batch)
            res = self.session.run(names, {self.input_name: chunk, **feeds_w})
            outs.append(np.asarray(res[0][:k], np.float64))
            if on_batch is not None:
                vals = {n: r[:k] for n, r in zip(names[1:], res[1:])}
                if self.input_name in self.tensors:
                    vals[self.input_name] = chunk[:k]
                on_batch(s, vals)
        self.passes += 1
        self.seconds += time.perf_counter() - t0
        if not outs:
            raise GDWSError("no samples")
        z = np.concatenate(outs)
        if z.ndim != 2:
            raise GDWSError(f"the model output has shape {list(z.shape)}; alphas need (N, classes) logits")
        return z


def input_sums(probe: ActivationProbe, x: np.ndarray, tensors: list[str],
               weights: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One pass: logits and, per tensor, (sum over samples of t, of t^2), float64 (C, *spatial)."""
    sums: dict[str, list] = {}

    def add(_, vals):
        for t in tensors:
            v = np.asarray(vals[t], np.float64)
            s1, s2 = v.sum(0), (v * v).sum(0)
            if t in sums:
                sums[t][0] += s1
                sums[t][1] += s2
            else:
                sums[t] = [s1, s2]

    z = probe.run(x, weights, on_batch=add)
    return z, {t: (a, b) for t, (a, b) in sums.items()}


# ----------------------------------------------------------------------------- forward alphas

SPLITS = ("sample", "mean")


@dataclass
class ForwardSensitivityResult(SensitivityResult):
    """SensitivityResult of `forward_alphas`, plus its factors per conv: energy[name] = e_{l,c}
    (C,), layer_total[name] = T_l = sum_c alpha_{l,c}, layer_sensitivity[name] = s_l =
    T_l / sum_c e_{l,c}, and noise_std[name] = T_l's standard error over the noise draws."""

    energy: dict[str, np.ndarray] = field(default_factory=dict)
    layer_sensitivity: dict[str, float] = field(default_factory=dict)
    layer_total: dict[str, float] = field(default_factory=dict)
    noise_std: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict:
        d = super().metadata()
        st = self.settings
        weight = "/ (2 d_j^2 (M/groups) K v)" if st.get("weighting") == "noise-gain" else "/ ((M/groups) K v)"
        split = ("alpha_{l,c} = mean_i t_{l,i} E_{i,c} / sum_c' E_{i,c'}" if st.get("split") == "sample"
                 else "alpha_{l,c} = e_{l,c} s_l, s_l = T_l / sum_c e_{l,c}")
        d["format"] = "onnx-gdws forward alphas v1"
        d["formula"] = (f"{split}; E_{{i,c}} = ||x_c patch||^2 of sample i averaged over output positions, "
                        f"e_{{l,c}} = mean_i E_{{i,c}}; t_{{l,i}} = sum_{{j != t_i}} E[(Delta d_j)^2] {weight}, "
                        "T_l = mean_i t_{l,i}; Delta: Gaussian noise of per-element variance v on layer l only, "
                        "antithetic central differences, fresh noise per noise batch")
        d["layer_sensitivity"] = dict(self.layer_sensitivity)
        d["layer_total"] = dict(self.layer_total)
        d["layer_total_std_error"] = dict(self.noise_std)
        d["energy_mean"] = {k: float(v.mean()) if v.size else 0.0 for k, v in self.energy.items()}
        return d


def sample_channel_energy(x: np.ndarray, site: ConvSite) -> np.ndarray:
    """E_{i,c}: per sample, the mean over output positions of ||x_c patch||^2, shape (N, C)."""
    v = np.asarray(x, np.float64) ** 2
    n, c = v.shape[:2]
    return patch_means(v.reshape(n * c, *v.shape[2:]), 1, *site_geometry(site, v.shape[2:])).sum(1).reshape(n, c)


def _gradient_source() -> str:
    """torch when it is installed (exact on every conv form), else onnx-ad."""
    return "torch" if importlib.util.find_spec("torch") is not None else "onnx-ad"


def _sample_weights(z: np.ndarray, weighting: str, min_margin: float) -> np.ndarray:
    """sum_{j != t} w_j per sample: how much a sample can weigh in T_l (1/(2 d^2) is heavy-tailed)."""
    n, classes = z.shape
    if weighting == "margin":
        return np.full(n, classes - 1.0)
    t = z.argmax(1)
    d = z[np.arange(n), t][:, None] - z
    off = np.ones_like(d, bool)
    off[np.arange(n), t] = False
    keep = off & (d >= max(min_margin, np.finfo(np.float64).tiny))
    return np.where(keep, 1.0 / (2.0 * np.where(keep, d, 1.0) ** 2), 0.0).sum(1)


def _noise_terms(probe: ActivationProbe, site: ConvSite, x: np.ndarray, z: np.ndarray, w: np.ndarray,
                 std: float, rng: np.random.Generator, idx: np.ndarray, noise_batch: int, weighting: str,
                 min_margin: float) -> np.ndarray:
    """One antithetic draw for the samples idx (a fresh Delta per `noise_batch` of them):
    margin_terms per sample, shape (len(idx),)."""
    out = np.zeros(len(idx))
    for s in range(0, len(idx), noise_batch):
        sel = idx[s:s + noise_batch]
        delta = rng.standard_normal(w.shape) * std
        zp = probe.run(x[sel], {site.name: w + delta})
        zm = probe.run(x[sel], {site.name: w - delta})
        out[s:s + len(sel)] = margin_terms(z[sel], zp, zm, weighting, min_margin)[0]
    return out


def forward_alphas(model: onnx.ModelProto, x: np.ndarray, *, noise: float = DEFAULT_NOISE,
                   draws: int = DEFAULT_DRAWS, tail: float = DEFAULT_TAIL, tail_draws: int = DEFAULT_TAIL_DRAWS,
                   noise_batch: int = DEFAULT_NOISE_BATCH, seed: int = 0, weighting: str = DEFAULT_WEIGHTING,
                   split: str = "sample", min_margin: float = DEFAULT_MIN_MARGIN, batch_size: int = 256,
                   threads: int | None = None, attack: AttackSettings | None = None, y: np.ndarray | None = None,
                   progress: Progress | None = None) -> ForwardSensitivityResult:
    """Forward-only alphas of every conv with a constant weight (module docstring), on ONNX Runtime.

    x: (N, ...) calibration inputs. noise: relative sigma (per-element std sigma ||W_l|| /
    sqrt(size)). Every sample gets `draws` antithetic noise draws per layer, and the `tail`
    fraction of samples with the largest weight sum_j 1/(2 d_j^2) gets `tail_draws` (noise-gain
    weighting only: those few samples carry most of T_l). `noise_batch` consecutive samples
    share a draw (1: each its own, so the per-sample estimates are independent). seed: the noise
    seed (deterministic for a seed). weighting: "margin" (default: unweighted, t_{l,i} = mean
    squared margin change per unit noise energy) or "noise-gain" (1/(2 d_j^2): the gradient
    alphas' units, for `--mismatch-budget`). split: "sample" (alpha_{l,c} = mean_i t_{l,i} E_{i,c} /
    sum_c' E_{i,c'}, each sample's channel energies weighted by its own output sensitivity) or
    "mean" (alpha_{l,c} = e_{l,c} s_l). Both give sum_c alpha_{l,c} = T_l. attack (PGD only):
    compute at `sensitivity.pgd_inputs` against y (or the clean top-1), with the torch gradient
    source when torch is installed, else onnx-ad (the alphas themselves stay forward-only).
    Cost: 1 + 2 L (draws N + (tail_draws - draws) tail N) / N passes over x."""
    t_total = time.perf_counter()
    if weighting not in WEIGHTINGS:
        raise GDWSError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if split not in SPLITS:
        raise GDWSError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not noise > 0 or not math.isfinite(noise):
        raise GDWSError(f"noise must be > 0, got {noise}")
    if draws < 1 or batch_size < 1 or noise_batch < 1 or tail_draws < 0:
        raise GDWSError("draws, noise batch and batch size must be >= 1, tail draws >= 0")
    if not 0 <= tail <= 1:
        raise GDWSError(f"tail must be in [0, 1], got {tail}")
    if not min_margin >= 0:
        raise GDWSError(f"min margin must be >= 0, got {min_margin}")
    x = np.ascontiguousarray(x, np.float32)
    sites, skipped = alpha_sites(model, x)
    timings: dict[str, float] = {}
    attack_info = None
    if attack is not None:
        t0 = time.perf_counter()
        x, attack_info = pgd_inputs(model, x, y, attack, threads=threads, gradient=_gradient_source())
        timings["attack"] = time.perf_counter() - t0
    n = len(x)
    probe = ActivationProbe(model, [s.node.input[0] for s in sites], sites, batch_size=batch_size, threads=threads)

    t0 = time.perf_counter()
    per_sample_energy = {s.name: np.zeros((n, s.in_channels)) for s in sites}

    def energies(start, vals):
        for s in sites:
            e = sample_channel_energy(vals[s.node.input[0]], s)
            per_sample_energy[s.name][start:start + len(e)] = e

    z = probe.run(x, on_batch=energies)
    if z.shape[1] < 2:
        raise GDWSError("alphas need a classifier with at least 2 outputs")
    energy = {k: v.mean(0) for k, v in per_sample_energy.items()}
    skipped_terms = margin_terms(z, z, z, weighting, min_margin)[1]
    heavy = np.zeros(0, np.int64)
    if weighting == "noise-gain" and tail > 0 and tail_draws > draws:
        sw = _sample_weights(z, weighting, min_margin)
        k = min(n, int(math.ceil(tail * n)))
        heavy = np.sort(np.argsort(-sw, kind="stable")[:k])
        heavy = heavy[sw[heavy] > 0]
    counts = np.full(n, float(draws))
    counts[heavy] = tail_draws
    units = draws + (tail_draws - draws) * len(heavy) / n if len(heavy) else draws  # passes per layer / 2
    total_passes = 1 + 2 * units * len(sites)
    timings["energy"] = time.perf_counter() - t0
    if progress:
        progress(1, total_passes)

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    infos, alphas, mass, s_l, t_l, t_se = [], {}, {}, {}, {}, {}
    for site in sites:
        info = LayerInfo(site.name, site.in_channels, site.out_channels, site.group, site.kernel_shape,
                         (site.out_channels // site.group) * site.kernel_size)
        infos.append(info)
        w = site.weight.astype(np.float64)
        std = noise * float(np.linalg.norm(w)) / math.sqrt(w.size)
        acc, acc_sq = np.zeros(n), np.zeros(n)
        everyone = np.arange(n)
        for _ in range(draws):
            t = _noise_terms(probe, site, x, z, w, std, rng, everyone, noise_batch, weighting, min_margin)
            acc += t
            acc_sq += t * t
            if progress:
                progress(2, total_passes)
        for _ in range(int(tail_draws) - draws if len(heavy) else 0):
            t = _noise_terms(probe, site, x, z, w, std, rng, heavy, noise_batch, weighting, min_margin)
            acc[heavy] += t
            acc_sq[heavy] += t * t
        if len(heavy) and progress:
            progress(2 * (units - draws), total_passes)
        norm = std ** 2 * info.block_size
        if norm > 0:
            per_sample = acc / counts / norm
            # the noise draws' standard error of T_l (exact for noise_batch 1: independent draws)
            var_i = np.maximum(acc_sq / norm ** 2 - counts * per_sample ** 2, 0) / np.maximum(counts - 1, 1)
            t_se[site.name] = float(np.sqrt(np.sum(var_i / counts)) / n) if draws > 1 else float("nan")
        else:
            per_sample = np.zeros(n)
            t_se[site.name] = 0.0
        total = float(per_sample.mean())
        e_sum = float(energy[site.name].sum())
        t_l[site.name] = total
        s_l[site.name] = total / e_sum if e_sum > 0 else 0.0
        if split == "mean":
            alphas[site.name] = energy[site.name] * s_l[site.name]
        else:
            e = per_sample_energy[site.name]
            tot = e.sum(1, keepdims=True)
            share = np.divide(e, tot, out=np.zeros_like(e), where=tot > 0)
            alphas[site.name] = (per_sample[:, None] * share).mean(0)
        mass[site.name] = per_sample
    timings["noise"] = time.perf_counter() - t0
    timings["ort"] = probe.seconds
    timings["total"] = time.perf_counter() - t_total
    return ForwardSensitivityResult(
        alphas=alphas, layers=infos, samples=n, classes=int(z.shape[1]),
        skipped_terms=skipped_terms, skipped_convs=skipped, sample_mass=mass, attack=attack_info,
        settings={"method": "forward", "noise": noise, "draws": draws, "tail": tail, "tail_draws": tail_draws,
                  "tail_samples": int(len(heavy)), "noise_batch": noise_batch, "seed": seed,
                  "weighting": weighting, "split": split, "min_margin": min_margin, "batch_size": batch_size,
                  "threads": threads, "ort_runs": probe.passes, "runtime": "onnxruntime"},
        timings=timings, energy=energy, layer_sensitivity=s_l, layer_total=t_l, noise_std=t_se)
