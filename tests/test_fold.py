"""Folding a GDWS Gather into the producing Conv: exact against ONNX Runtime, refused where it
would change other readers, and chosen only when (injected) measurements say it is faster."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import small_cnn
from onnx import TensorProto, helper, numpy_helper

from gdws_onnx.core import decompose
from gdws_onnx import optimize
from gdws_onnx.runtime.bench import Ratio
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.graph.fold import FoldGatherPass, FoldSite, GraphIndex
from gdws_onnx.graph.pattern import DEPTHWISE, find_gdws_layers, is_gdws_node
from gdws_onnx.cli.render import latency_lines
from gdws_onnx.graph.rewrite import GDWSRewritePass, LayerRewrite


def _chain_model(chain: list[str], producer_group: int = 1, branch: bool = False,
                 target_group: int = 1) -> onnx.ModelProto:
    """x -> conv0 (8 ch) -> chain ops -> conv1 (6 ch) [-> + a second reader of conv0's output]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4 // producer_group, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.standard_normal((6, 8 // target_group, 3, 3)).astype(np.float32), "w1")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["t0"], name="conv0", pads=[1] * 4,
                              group=producer_group)]
    prev = "t0"
    for k, op in enumerate(chain):
        out, extra, attrs = f"t{k + 1}", [], {}
        if op == "BatchNormalization":
            for p, v in zip(("s", "bb", "m", "v"), (rng.random(8) + 0.5, rng.standard_normal(8),
                                                     rng.standard_normal(8), rng.random(8) + 0.5)):
                inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{k}"))
                extra.append(f"{p}{k}")
        if op in ("MaxPool", "AveragePool"):
            attrs = dict(kernel_shape=[2, 2], strides=[2, 2])
        if op == "PRelu":
            inits.append(numpy_helper.from_array(rng.random((8, 1, 1)).astype(np.float32), f"slope{k}"))
            extra.append(f"slope{k}")
        nodes.append(helper.make_node(op, [prev, *extra], [out], name=f"{op.lower()}{k}", **attrs))
        prev = out
    nodes.append(helper.make_node("Conv", [prev, "w1"], ["y"], name="conv1", pads=[1] * 4, group=target_group))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])]
    if branch:
        outputs.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _gdws_full_rank(model: onnx.ModelProto, layer: str = "conv1") -> onnx.ModelProto:
    """Rewrite `layer` exactly (full rank, so G > C and a Gather is needed)."""
    site = next(s for s in find_convs(model) if s.name == layer)
    spec = decompose.spectrum(site.weight, site.group)
    f = decompose.factors(spec, np.full(site.in_channels, spec.max_rank))
    return GDWSRewritePass([LayerRewrite(site, f)]).call(model).model


def _run(model: onnx.ModelProto) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x})[0]


@pytest.mark.parametrize("chain", [[], ["Relu"], ["Relu", "MaxPool"], ["BatchNormalization", "Relu"],
                                   ["Clip", "AveragePool", "Sigmoid"]])
def test_fold_is_exact_and_removes_the_gather(chain):
    _check_fold_exact(chain, target_group=1)


def test_fold_is_exact_for_a_grouped_gdws_layer_and_an_unnamed_producer():
    _check_fold_exact(["Relu"], target_group=2, unnamed=True)


def _check_fold_exact(chain, target_group, unnamed=False):
    original = _chain_model(chain, target_group=target_group)
    model = _chain_model(chain, target_group=target_group)
    if unnamed:
        model.graph.node[0].name = ""
    rewritten = _gdws_full_rank(model)
    assert any(n.op_type == "Gather" for n in rewritten.graph.node)
    result = FoldGatherPass().call(onnx.ModelProto.FromString(rewritten.SerializeToString()))
    folded = result.model
    onnx.checker.check_model(folded)
    assert result.modified and result.report.folded == {"conv1": "t0" if unnamed else "conv0"}
    assert result.report.skipped == {}
    assert not any(n.op_type == "Gather" for n in folded.graph.node)
    w0 = next(t for t in folded.graph.initializer if t.name.startswith("w0"))
    assert w0.dims[0] > 8  # the producer emits the G > C gathered channels
    ref = _run(original)
    np.testing.assert_allclose(_run(folded), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert {t.name for t in folded.graph.initializer} >= {n.input[1] for n in folded.graph.node if n.op_type == "Conv"}
    assert not {"w0", "b0"} & {t.name for t in folded.graph.initializer}  # the old weights are gone


@pytest.mark.parametrize(("case", "reason"), [("branch", "'t0' has other readers or is a graph output"),
                                              ("grouped", "producer conv 'conv0' is grouped (group=2)"),
                                              ("prelu", "PRelu 'prelu0' lies between the Gather and a Conv")])
def test_fold_is_refused_where_it_would_change_something_else(case, reason):
    model = _chain_model(["PRelu"] if case == "prelu" else ["Relu"] if case != "branch" else [],
                         producer_group=2 if case == "grouped" else 1, branch=case == "branch")
    rewritten = _gdws_full_rank(model)
    (layer,) = find_gdws_layers(rewritten.graph)
    assert reason in FoldGatherPass().check(FoldSite(layer, GraphIndex(rewritten.graph)))
    before = rewritten.SerializeToString()
    result = FoldGatherPass().call(rewritten)
    assert not result.modified and result.report.folded == {} and reason in result.report.skipped["conv1"]
    assert rewritten.SerializeToString() == before


class FoldProbe:
    """Fake whole-model times: each GDWS layer saves 100, each Gather costs `gather_price`, and
    every Conv weight element 0.01 (so a widened producer costs a little)."""

    def __init__(self, gather_price: float):
        self.price = gather_price

    def cost(self, model: onnx.ModelProto) -> float:
        sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
        nodes = model.graph.node
        return (1000.0 - 100 * sum(is_gdws_node(n, DEPTHWISE) for n in nodes)
                + self.price * sum(n.op_type == "Gather" for n in nodes)
                + 0.01 * sum(sizes.get(n.input[1], 0) for n in nodes if n.op_type == "Conv"))

    def compare(self, baseline, candidate, threshold=None):
        b, c = self.cost(baseline), self.cost(candidate)
        return Ratio("baseline", "candidate", c / b, c / b, c / b, b / 1000, c / 1000)


def _latency_optimize(gather_price: float):
    class LayerProbe(FoldProbe):  # every GDWS layer measures 2x faster than its conv
        def compare(self, baseline, candidate, threshold=None):
            return Ratio("baseline", "candidate", 0.5, 0.5, 0.5, 1.0, 0.5)

    return optimize(small_cnn(channels=(16, 32, 32)), conv="gdws", target="latency", error_budget=0.3, cache="",
                    probe_factory=lambda b, kind: LayerProbe(0) if kind == "layer"
                    else FoldProbe(gather_price))


def test_latency_target_folds_only_when_measured_faster():
    out, report = _latency_optimize(gather_price=100)  # Gathers cost more than wider producers: folding wins
    assert report.latency["folded"] and all(t["folded"] for t in report.latency["fold_trials"])
    assert report.verification.ran  # against the original (not exact: error budget 0.3)
    assert not any(n.op_type == "Gather" for n in out.graph.node)
    folded = [layer for layer in report.layers if "folded into" in layer.realization]
    lines = latency_lines(report.latency)
    assert sum("-> folded" in line for line in lines) == len(report.latency["folded"])
    assert {layer.name for layer in folded} == set(report.latency["folded"])
    out2, report2 = _latency_optimize(gather_price=0.0)  # wider producers only cost: no fold
    assert report2.latency["fold_trials"] and not report2.latency["folded"]
    assert any(n.op_type == "Gather" for n in out2.graph.node)
    # the folded producers carry the extra output channels' MACs
    before = {layer.name: layer.macs_per_pixel_after for layer in report2.layers}
    after = {layer.name: layer.macs_per_pixel_after for layer in report.layers}
    producers = {"conv0" if layer.name == "conv1" else "conv1" for layer in folded}
    assert all(after[p] > before[p] for p in producers)
    assert report.conv_macs_after > report2.conv_macs_after
    # same ranks, folded or not: the fold itself is exact in ORT
    assert [layer.total_rank for layer in report.layers] == [layer.total_rank for layer in report2.layers]
    x = np.random.default_rng(3).random((4, *[d.dim_value or 1 for d in out.graph.input[0].type.tensor_type.shape.dim][1:]),
                                        dtype=np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
           .run(None, {m.graph.input[0].name: x})[0] for m in (out, out2)]
    np.testing.assert_allclose(run[0], run[1], rtol=1e-4, atol=1e-5)
