"""`optimize --quantize int8`: static QDQ INT8 after the GDWS rewrite; QDQ around every GDWS conv
in the graph, QLinearConv for every one of them in ONNX Runtime's optimized graph, agreement with
the original, the option's errors, and what is preserved. No timing."""

import json
import platform

import numpy as np
import onnx
import pytest
from builders import annotated_cnn, assert_model_info_kept, small_cnn
from onnx import TensorProto, helper, numpy_helper
from validate_helpers import fashion, fm_cnn

from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.core import decompose
from gdws_onnx.errors import GDWSError, OptionError
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.graph.fold import FoldGatherPass
from gdws_onnx.graph.pattern import DEPTHWISE, POINTWISE, node_name
from gdws_onnx.graph.qdq import int8_coverage
from gdws_onnx.graph.rewrite import GDWSRewritePass, LayerRewrite
from gdws_onnx.peers import QuantizeInt8Pass
from gdws_onnx.runtime.kernels import conv_kernels, optimized_graph
from gdws_onnx.runtime.session import make_session

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = make_session(model, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _qdq_wrapped(model: onnx.ModelProto, conv: onnx.NodeProto) -> bool:
    """Written out here, apart from graph.qdq: DequantizeLinear on data and weight, and the
    output read by one QuantizeLinear only (directly: these models' Relus go when quantized)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = [n for n in model.graph.node if conv.output[0] in n.input]
    return (producer.get(conv.input[0]) is not None and producer[conv.input[0]].op_type == "DequantizeLinear"
            and producer.get(conv.input[1]) is not None and producer[conv.input[1]].op_type == "DequantizeLinear"
            and [n.op_type for n in readers] == ["QuantizeLinear"])


def _gdws_conv_names(layers) -> set[str]:
    return {node_name(layer.name, role) for layer in layers for role in (DEPTHWISE, POINTWISE)}


GDWS_OPTIONS = dict(error_budget=0.02, skip_first=False, force=True, threads=1, target="macs",
                    mixed_precision=False)  # every conv INT8 (mixed precision: tests/test_mixed_precision.py)


@pytest.fixture(scope="module")
def fm_int8(fashion_mnist):
    """fm_cnn, every conv GDWS-rewritten (the first included), then INT8 on Fashion-MNIST train."""
    model = fm_cnn()
    out, report = optimize(model, quantize="int8", data="fashion-mnist:train", **GDWS_OPTIONS)
    return model, out, report


def test_every_gdws_conv_is_qdq_wrapped_in_the_graph(fm_int8):
    _, out, report = fm_int8
    assert len(report.rewritten) == 2
    gdws = _gdws_conv_names(report.rewritten)
    convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    assert gdws <= set(convs), (gdws, set(convs))
    assert all(_qdq_wrapped(out, convs[name]) for name in gdws)
    assert any(n.op_type == "Gather" for n in out.graph.node)  # the channel selection is there too
    coverage = int8_coverage(out)
    assert {c.name for c in coverage.gdws} == gdws and all(c.wrapped for c in coverage.convs)
    assert report.quantize.convs_quantized == len(convs)


def test_ort_runs_every_gdws_conv_as_qlinearconv(fm_int8):
    _, out, report = fm_int8
    gdws = _gdws_conv_names(report.rewritten)
    kernels = {k.name: k.op_type for k in conv_kernels(out).convs}
    assert all(kernels[name] == "QLinearConv" for name in gdws), kernels
    ops = [n.op_type for n in optimized_graph(out).graph.node]  # independently: no float conv is left
    assert ops.count("QLinearConv") == len(kernels) and "Conv" not in ops and "FusedConv" not in ops
    k = report.quantize.int8_kernels
    assert (k["gdws_convs"], k["gdws_int8"], k["int8"], k["not_int8"]) == (4, 4, 4, [])


def test_quantized_outputs_agree_with_the_original(fm_int8):
    """The quantization error (against the same GDWS model in float) is small; against the original
    it adds little to the GDWS error itself (this random-feature classifier is sensitive to it)."""
    model, out, report = fm_int8
    gdws, _ = optimize(model, verify=False, **GDWS_OPTIONS)
    x, _ = fashion(64, "test")
    ref, float_gdws, new = _run(model, x), _run(gdws, x), _run(out, x)
    assert np.abs(new - float_gdws).max() <= 0.1 * np.abs(float_gdws).max()
    assert (new.argmax(1) == float_gdws.argmax(1)).mean() >= 0.95
    agreement = (new.argmax(1) == ref.argmax(1)).mean()
    assert agreement >= 0.85 and agreement >= (float_gdws.argmax(1) == ref.argmax(1)).mean() - 0.05
    v = report.verification
    assert v.ran and v.passed and v.max_error is None  # no gate unless asked: quantization error is expected
    assert "quantization error" in v.message and v.outputs[0].relative > 0
    q = report.to_dict()["quantize"]
    assert (q["scheme"], q["samples"], q["calibration"]) == ("int8", 256, "the first 256 samples of fashion-mnist:train")
    assert "uint8 activations" in q["method"] and json.dumps(report.to_dict(), default=str)


def test_conv_off_quantizes_the_original_convs_only(fashion_mnist):
    model = fm_cnn()
    out, report = optimize(model, conv="off", quantize="int8", data="fashion-mnist:train", threads=1, target="macs",
                           mixed_precision=False)
    assert not report.rewritten and report.quantize is not None
    names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [n.name for n in out.graph.node if n.op_type == "Conv"] == names  # the same convs, not rewritten
    assert all(_qdq_wrapped(out, n) for n in out.graph.node if n.op_type == "Conv")
    assert [k.op_type for k in conv_kernels(out).convs] == ["QLinearConv"] * len(names)
    k = report.quantize.int8_kernels
    assert (k["convs"], k["int8"], k["gdws_convs"]) == (len(names), len(names), 0)
    x, _ = fashion(64, "test")
    assert (_run(out, x).argmax(1) == _run(model, x).argmax(1)).mean() >= 0.9


def _residual_cnn() -> onnx.ModelProto:
    """conv0 -> relu -> conv1 -> relu -> conv2, + the relu0 output -> Add -> Relu: an activation
    that branches (read by conv1 and by the Add)."""
    rng = np.random.default_rng(3)
    inits, nodes = [], []
    for i, c_in in enumerate((3, 8, 8)):
        inits += [numpy_helper.from_array((rng.standard_normal((8, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), f"b{i}")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r0"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu_out")]
    model = helper.make_model(helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 10, 10])], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.skipif(not X86, reason="x86's CPU EP refuses int8 activations in QLinearConv; ARM runs them")
def test_the_kernel_check_sees_float_convs_and_uint8_activations_avoid_them(tmp_path):
    """With int8 activations, ORT converts a Q -> DQ pair to uint8 only where the Q has one reader:
    around the branching activation the convs stay float Conv although the graph has them all
    QDQ-wrapped. The runtime check must see that; optimize's uint8 activations leave none float."""
    model = _residual_cnn()
    x = np.random.default_rng(0).random((64, 3, 10, 10)).astype(np.float32)
    s8 = QuantizeInt8Pass(x, activation_type="int8").call(model).model
    assert all(c.wrapped for c in int8_coverage(s8).convs)
    float_convs = {k.name for k in conv_kernels(s8).convs if not k.int8}
    assert {"conv0", "conv1"} <= float_convs
    np.savez(tmp_path / "x.npz", x=x)
    out, report = optimize(model, conv="off", quantize="int8", data=str(tmp_path / "x.npz"), target="macs",
                           mixed_precision=False)
    assert [k.op_type for k in conv_kernels(out).convs] == ["QLinearConv"] * 3
    assert report.quantize.int8_kernels["not_int8"] == []


def _realization(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """Every conv but the first as GDWS at half rank per channel, in the given realization."""
    sites = find_convs(model)[1:]
    rewrites = []
    for i, s in enumerate(sites):
        spec = decompose.spectrum(s.weight, s.group)
        ranks = np.maximum(1, (np.arange(s.in_channels) + i) % spec.max_rank)  # unequal: a Gather is needed
        rewrites.append(LayerRewrite(s, decompose.factors(spec, ranks, s.weight.dtype, multiplier=form == "multiplier",
                                                          stacked=form == "stacked")))
    GDWSRewritePass(rewrites).call(model)
    if form == "fold":
        assert FoldGatherPass().call(model).report.folded
    return model


@pytest.mark.parametrize("form", ["gather", "fold", "multiplier", "stacked"])
def test_every_realization_runs_its_convs_as_qlinearconv(form):
    """The realizations the latency planner may choose (for a later --target latency --quantize)."""
    model = _realization(small_cnn(seed=2, channels=(8, 16, 16)), form)
    x = np.random.default_rng(1).random((64, 3, 12, 12)).astype(np.float32)
    q = QuantizeInt8Pass(x, activation_type="uint8").call(model).model
    coverage = int8_coverage(q)
    assert coverage.gdws and all(c.wrapped for c in coverage.convs)
    assert [k.op_type for k in conv_kernels(q).convs] == ["QLinearConv"] * len(coverage.convs)


def test_a_conv_with_a_float_weight_is_reported_by_both_checks(fm_int8):
    """Dequantize one pointwise conv's weight into a float initializer: the graph check says what is
    missing, and ORT runs that conv as a float conv (the others stay int8)."""
    _, out, report = fm_int8
    model = onnx.ModelProto()
    model.CopyFrom(out)
    pw = node_name(report.rewritten[-1].name, POINTWISE)
    conv = next(n for n in model.graph.node if n.name == pw)
    dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, scale, zero = (inits[name].astype(np.float32) for name in dq.input[:3])
    shape = (-1,) + (1,) * (q.ndim - 1)
    model.graph.initializer.append(numpy_helper.from_array((q - zero.reshape(shape)) * scale.reshape(shape),
                                                           dq.output[0]))
    model.graph.node.remove(dq)
    c = next(c for c in int8_coverage(model).convs if c.name == pw)
    assert not c.wrapped and c.missing == ["no DequantizeLinear of a constant on its weight"]
    kernels = {k.name: k for k in conv_kernels(model).convs}
    assert kernels[pw].op_type and not kernels[pw].int8
    assert sum(k.int8 for k in kernels.values()) == len(kernels) - 1


def test_float_models_have_no_wrapped_conv():
    coverage = int8_coverage(small_cnn())
    assert coverage.convs and not coverage.wrapped and not coverage.gdws
    assert "no DequantizeLinear on its data input" in coverage.convs[0].missing


def test_preserves_ir_opsets_metadata_and_io(tmp_path):
    model = annotated_cnn()
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((40, 3, 12, 12)).astype(np.float32))
    out, report = optimize(model, error_budget=0.1, quantize="int8", data=str(tmp_path / "x.npz"), target="macs")
    assert report.rewritten and report.quantize.samples == 40
    assert out.ir_version == 7 and out.producer_name == "me"  # not the quantizer's
    assert_model_info_kept(out, model)
    assert model.graph.node[0].op_type == "Conv"  # the caller's model is not modified
    onnx.checker.check_model(out, full_check=True)


def test_quantize_needs_data_and_no_float_latency_table():
    with pytest.raises(OptionError) as e:
        optimize(small_cnn(), quantize="int8", target="macs")
    assert e.value.params == ("quantize", "data")
    with pytest.raises(OptionError) as e:
        optimize(small_cnn(), quantize="int8", data="x.npz", target="latency", latency_table="t.json")
    assert e.value.params == ("quantize", "latency_table")
    with pytest.raises(OptionError, match="quantize must be one of off, int8"):
        optimize(small_cnn(), quantize="int4", data="x.npz", target="macs")


def test_cli_without_data_exits_2_naming_both_flags_and_writes_nothing(runner, cnn_path, tmp_path):
    out = tmp_path / "o.onnx"
    r = runner.invoke(main, ["optimize", cnn_path, "-o", str(out), "--quantize", "int8", "--target", "macs"])
    assert r.exit_code == 2 and "--quantize" in r.output and "--data" in r.output
    assert not out.exists()


def test_cli_refuses_per_channel_int8_below_opset_13_before_any_work(runner, tmp_path):
    model = small_cnn()
    model.opset_import[0].version = 11
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 3, 12, 12), np.float32))
    r = runner.invoke(main, ["optimize", str(path), "-o", str(out), "--quantize", "int8", "--data",
                             str(tmp_path / "x.npz"), "--target", "macs"])
    assert r.exit_code == 2 and "opset >= 13" in r.output and not out.exists()
    with pytest.raises(GDWSError, match="opset >= 13"):
        QuantizeInt8Pass(np.zeros((4, 3, 12, 12), np.float32)).call(model)


def test_cli_prints_the_int8_line_and_writes_the_report(runner, cnn_path, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((32, 3, 12, 12)).astype(np.float32))
    r = runner.invoke(main, ["optimize", cnn_path, "-o", str(out), "--error-budget", "0.1", "--quantize", "int8",
                             "--data", str(tmp_path / "x.npz"), "--report", str(rep), "--target", "macs",
                             "--no-mixed-precision"])
    assert r.exit_code == 0, r.output
    assert "int8: QDQ, per-channel int8 weights" in r.output and "as int8 kernels" in r.output
    assert "include the quantization error" in r.output
    q = json.loads(rep.read_text())["quantize"]
    assert q["convs_quantized"] == q["int8_kernels"]["convs"] == q["int8_kernels"]["int8"]
    assert q["int8_kernels"]["gdws_int8"] == q["int8_kernels"]["gdws_convs"] > 0
    assert json.loads(rep.read_text())["options"]["quantize"] == "int8"


class Int8Probe:
    """A fake probe that records what it is asked to compare (every model it sees must be INT8)
    and calls a layer faster when its name is in `fast`; whole models: faster when any GDWS node."""

    def __init__(self, kind, fast, seen):
        self.kind, self.fast, self.seen = kind, fast, seen

    def compare(self, baseline, candidate, threshold=None):
        from gdws_onnx.graph.pattern import is_gdws_node, layer_of
        from gdws_onnx.runtime.bench import Ratio

        for m in (baseline, candidate):
            self.seen.append((self.kind, sum(n.op_type == "QuantizeLinear" for n in m.graph.node)))
        layers = {layer_of(n.name) for n in candidate.graph.node if is_gdws_node(n)}
        win = bool(layers & self.fast) if self.kind == "layer" else bool(layers)
        r = 0.6 if win else 1.3
        return Ratio("b", "c", r, r - 0.01, r + 0.01, 1.0, r, ci_low=r - 0.02, ci_high=r + 0.02, rounds=40,
                     confidence=0.99)


def test_target_latency_with_int8_times_int8_forms_against_int8_alone(tmp_path):
    """--target latency --quantize int8: every layer and whole-model comparison is between INT8
    models (the whole-model baseline is the original in INT8), a layer is kept only where its INT8
    GDWS form is faster, the cache keeps INT8 timings apart, and the result is quantized."""
    model = small_cnn(channels=(8, 16, 24), size=8)
    x = np.random.default_rng(0).random((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    names = [s.name for s in find_convs(model)]
    seen = []
    factory = lambda batch, kind: Int8Probe(kind, {names[1]}, seen)  # noqa: E731
    cache = str(tmp_path / "c.json")
    out, report = optimize(model, target="latency", error_budget=0.3, quantize="int8", data=str(tmp_path / "x.npz"),
                           cache=cache, probe_factory=factory, payoff=0, mixed_precision=False)
    assert seen and all(q > 0 for _, q in seen)  # never a float model
    assert {r.name for r in report.rewritten} == {names[1]}
    assert "QuantizeLinear" in {n.op_type for n in out.graph.node}
    assert all(k.get("int8") for k in report.quantize.convs if k["layer"] == names[1])
    entries = json.load(open(cache))
    float_seen = []
    optimize(model, target="latency", error_budget=0.3, cache=cache,
             probe_factory=lambda b, k: Int8Probe(k, {names[1]}, float_seen), verify=False)
    assert float_seen and any(q == 0 for _, q in float_seen)  # float run: INT8 cache entries not reused
    assert len(json.load(open(cache))) > len(entries)
