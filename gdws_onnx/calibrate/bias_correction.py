"""Bias correction of GDWS-rewritten convs on calibration data (a cheap post-training repair).

A rewritten conv computes conv(x, Q) + b instead of conv(x, W) + b; both are linear in x, so its
output error on an input x is conv(x, W - Q), whose mean over samples and output positions is,
per output channel m,

    mu_m = sum_{c, k} (W - Q)[m, c, k] * xbar[c, k],    xbar[c, k] = E x_c[p * s + k * d - pad]

(xbar: the mean input patch, zero padding included, `core.geometry.patch_means`). Setting
the GDWS layer's bias to b + mu makes the layer's mean output error per channel zero on the
calibration inputs, and it is the least-squares constant shift: it minimizes E ||y_W - y_Q - b'||^2
over shifts b', so the layer's squared output error drops by exactly P ||mu||^2 per sample (P
output positions) and never grows.

Which inputs: **sequential, on the rewritten model's own activations**. Layers are corrected in
graph order; layer l's xbar is measured on the rewritten model with every rewritten layer before
l already corrected, so a layer also absorbs the mean shift its corrected predecessors still
pass on (mean shifts of the *inputs* only; the objective is each layer's own output error on
the inputs it actually sees). One ONNX Runtime session serves every step: the corrected layers'
biases are fed as graph inputs.

Sections: numpy (mean error of a layer); ORT (the sequential pass); the graph edit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gdws_onnx.core.decompose import GDWSFactors, reconstruct
from gdws_onnx.core.geometry import out_spatial, patch_means, patches
from gdws_onnx.errors import GDWSError
from gdws_onnx.graph import pattern
from gdws_onnx.graph.cleanup import remove_unused
from gdws_onnx.graph.convs import ConstantResolver, ConvSite, site_geometry
from gdws_onnx.graph.passes import PassResult
from gdws_onnx.graph.rewrite import LayerRewrite, Names
from gdws_onnx.runtime.session import ORT_TYPES, make_session, run_batches, with_outputs


# ----------------------------------------------------------------------------- numpy

def mean_output_error(weight: np.ndarray, approx: np.ndarray, groups: int, xbar: np.ndarray) -> np.ndarray:
    """mu (M,): the mean over inputs of conv(x, weight) - conv(x, approx) per output channel,
    given xbar (C, K), the mean input patch (float64)."""
    m, cg = weight.shape[:2]
    k = int(np.prod(weight.shape[2:], dtype=np.int64))
    d = (np.asarray(weight, np.float64) - np.asarray(approx, np.float64)).reshape(groups, m // groups, cg, k)
    return np.einsum("gmck,gck->gm", d, np.asarray(xbar, np.float64).reshape(groups, cg, k)).reshape(m)


# ----------------------------------------------------------------------------- report

@dataclass
class LayerCorrection:
    """What bias correction did to one rewritten conv."""

    name: str
    status: str  # "corrected" or "skipped"
    reason: str = ""
    max_abs_shift: float = 0.0
    rms_shift: float = 0.0
    # E ||y_W - y_Q||^2 per sample on its calibration inputs, before and after the shift
    squared_error_before: float | None = None
    squared_error_after: float | None = None


@dataclass
class BiasCorrectionReport:
    samples: int
    inputs: str  # "sequential (rewritten model, corrected upstream)"
    layers: list[LayerCorrection] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- ORT pass + graph edit

@dataclass(frozen=True)
class BiasSite:
    """One rewritten conv as bias correction judges it: its rewrite, the pointwise Conv that now
    carries its bias in the model, and the model's constants."""

    rewrite: LayerRewrite
    node: onnx.NodeProto
    constants: ConstantResolver


@dataclass
class _Layer:
    site: ConvSite
    factors: GDWSFactors
    node: onnx.NodeProto  # the pointwise Conv of the rewritten graph (it carries the bias)
    bias: np.ndarray  # current bias, float64
    dtype: np.dtype
    feed: str = ""  # graph input name of the probe model


def _bias_value(site: BiasSite) -> tuple[np.ndarray | None, str]:
    """The pointwise conv's bias (zeros when it has none), float64, or None and why it is not constant."""
    node, m = site.node, site.rewrite.site.out_channels
    if len(node.input) < 3 or not node.input[2]:
        return np.zeros(m), ""
    value, _, source = site.constants.value(node.input[2])
    if value is None:
        return None, f"bias is not constant ({source})"
    return np.asarray(value, np.float64).reshape(m), ""


class BiasCorrectionPass:
    """`call(model)` shifts the bias of every rewritten conv of `model` (already rewritten by
    GDWSRewritePass with `rewrites`) by its mean output error on the calibration `feeds` (input
    name -> array, samples along axis 0), sequentially in graph order (module docstring), in place;
    the report is a BiasCorrectionReport. squared_error: also report each layer's E ||y_W - y_Q||^2
    per sample before / after (from its inputs' patch Gram matrices: (C K)^2 per group, slow on
    wide layers, for tests and diagnostics)."""

    def __init__(self, rewrites: list[LayerRewrite], feeds: dict[str, np.ndarray], *, batch_size: int = 128,
                 threads: int | None = None, squared_error: bool = False):
        self.rewrites = sorted(rewrites, key=lambda r: r.site.index)
        self.feeds = feeds
        self.batch_size = batch_size
        self.threads = threads
        self.squared_error = squared_error

    def check(self, site: BiasSite) -> str | None:
        """Why this conv's bias is not corrected (None: it is)."""
        return _bias_value(site)[1] or None

    def call(self, model: onnx.ModelProto) -> PassResult:
        t0 = time.perf_counter()
        n = {len(v) for v in self.feeds.values()}
        if len(n) != 1 or 0 in n:
            raise GDWSError("bias correction needs the same, non-zero number of samples for every input")
        n_samples = n.pop()
        report = BiasCorrectionReport(samples=n_samples, inputs="sequential (rewritten model, corrected upstream)")
        by_output = {nd.output[0]: nd for nd in model.graph.node if nd.op_type == "Conv" and nd.output}
        constants = ConstantResolver(model)
        layers: list[_Layer] = []
        for r in self.rewrites:
            node = by_output.get(r.site.node.output[0])
            if node is None:
                raise GDWSError(f"cannot find the rewritten pointwise conv of '{r.site.name}'")
            site = BiasSite(r, node, constants)
            reason = self.check(site)
            if reason is not None:
                report.layers.append(LayerCorrection(r.site.name, "skipped", reason))
                continue
            layers.append(_Layer(r.site, r.factors, node, _bias_value(site)[0], r.factors.pointwise.dtype))
        if layers:
            self._correct(model, layers, n_samples, report)
            _write_biases(model, layers)
        order = [r.site.name for r in self.rewrites]
        report.layers.sort(key=lambda rec: order.index(rec.name))
        report.seconds = time.perf_counter() - t0
        return PassResult(model, bool(layers), report)

    def _correct(self, model: onnx.ModelProto, layers: list[_Layer], n_samples: int,
                 report: BiasCorrectionReport) -> None:
        """Find each layer's bias shift in turn, on one probe session (module docstring)."""
        # the probe: every corrected layer's bias becomes a graph input; each layer's input an output
        probe = with_outputs(model, [lay.site.node.input[0] for lay in layers])
        names = Names(probe.graph)
        pnodes = {nd.output[0]: nd for nd in probe.graph.node if nd.op_type == "Conv" and nd.output}
        for lay in layers:
            lay.feed = names.fresh(pattern.node_name(lay.site.name, "bias_probe"))
            pn = pnodes[lay.node.output[0]]
            while len(pn.input) < 3:
                pn.input.append("")
            pn.input[2] = lay.feed
            probe.graph.input.append(helper.make_tensor_value_info(
                lay.feed, helper.np_dtype_to_tensor_dtype(np.dtype(lay.dtype)), [lay.site.out_channels]))
        sess = make_session(probe, threads=self.threads)
        input_types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in sess.get_inputs()}

        def moments(lay: _Layer, second: bool) -> tuple[np.ndarray, np.ndarray | None, tuple]:
            """Sum over samples of the layer's input (and, with `second`, of its patch Gram matrices)."""
            name = lay.site.node.input[0]
            s1, s2, shape = None, None, None
            bias_feeds = {other.feed: other.bias.astype(input_types[other.feed]) for other in layers}
            for values in run_batches(sess, self.feeds, [name], self.batch_size, extra=bias_feeds):
                v = np.asarray(values[name], np.float64)
                shape = v.shape[2:]
                s1 = v.sum(0) if s1 is None else s1 + v.sum(0)
                if second:
                    sq = _patch_gram(v, lay.site)
                    s2 = sq if s2 is None else s2 + sq
            return s1, s2, shape

        for lay in layers:
            site = lay.site
            q = reconstruct(lay.factors, site.in_channels)
            s1, gram, shape = moments(lay, self.squared_error)
            xbar = patch_means(s1, n_samples, *site_geometry(site, shape))
            mu = mean_output_error(site.weight, q, site.group, xbar)
            rec = LayerCorrection(site.name, "corrected", max_abs_shift=float(np.abs(mu).max(initial=0.0)),
                                  rms_shift=float(np.sqrt(np.mean(mu ** 2))) if mu.size else 0.0)
            if gram is not None:
                pixels = int(np.prod(_out_shape(site, shape)))
                before = _layer_squared_error(site.weight, q, site.group, gram / n_samples)
                rec.squared_error_before = before
                rec.squared_error_after = before - pixels * float(mu @ mu)
            lay.bias = lay.bias + mu
            report.layers.append(rec)


def _out_shape(site: ConvSite, in_spatial) -> tuple[int, ...]:
    k, s, p, d = site_geometry(site, in_spatial)
    return out_spatial(in_spatial, k, s, p, d)


def _patch_gram(v: np.ndarray, site: ConvSite) -> np.ndarray:
    """Sum over samples and output positions of the per-group patch outer products, shape
    (groups, Cg K, Cg K): E ||conv(x, D)||^2 = sum_g tr(D_g G_g D_g^T) / N."""
    pat = patches(v, *site_geometry(site, v.shape[2:]))  # (N, C, K, P)
    nb, c, kk, pp = pat.shape
    grp = site.group
    pat = pat.reshape(nb, grp, (c // grp) * kk, pp).transpose(1, 2, 0, 3).reshape(grp, (c // grp) * kk, nb * pp)
    return pat @ pat.transpose(0, 2, 1)


def _layer_squared_error(weight: np.ndarray, approx: np.ndarray, groups: int, gram: np.ndarray) -> float:
    """E ||conv(x, W - Q)||^2 per sample from the mean patch Gram matrices (groups, Cg K, Cg K)."""
    m = weight.shape[0]
    d = (np.asarray(weight, np.float64) - np.asarray(approx, np.float64)).reshape(groups, m // groups, -1)
    return float(np.einsum("gma,gab,gmb->", d, gram, d))


def _write_biases(model: onnx.ModelProto, layers: list[_Layer]) -> None:
    """Give each corrected pointwise conv a fresh bias tensor (an initializer, or a Constant node
    for IR < 4) and drop the old biases (and what computed them) that nothing reads anymore."""
    g = model.graph
    names = Names(g)
    old = set()
    constants = []
    for lay in layers:
        name = names.fresh(pattern.node_name(lay.site.name, "pw_bias"))
        t = numpy_helper.from_array(lay.bias.astype(lay.dtype), name)
        if model.ir_version < 4:
            constants.append((lay.node, helper.make_node("Constant", [], [name], name=name, value=t)))
        else:
            g.initializer.append(t)
        while len(lay.node.input) < 3:
            lay.node.input.append("")
        if lay.node.input[2]:
            old.add(lay.node.input[2])
        lay.node.input[2] = name
    for node, const in constants:
        idx = list(g.node).index(node)
        g.node.insert(idx, const)
    remove_unused(g, old)
