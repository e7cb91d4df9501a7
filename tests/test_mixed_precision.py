"""Mixed precision in the INT8 step (pipeline.mixed_precision): convs left float by name in the
quantizer, the profile screen, the greedy whole-model decision (fake probes: nothing here depends
on what the timing says), and its place in `optimize` and the CLI."""

import json

import numpy as np
import onnx
import pytest
from builders import small_cnn

from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.graph.qdq import int8_coverage
from gdws_onnx.peers import QuantizeInt8Pass
from gdws_onnx.pipeline import mixed_precision as mp
from gdws_onnx.pipeline.int8 import mixed_step
from gdws_onnx.pipeline.options import RunOptions, TimingOptions
from gdws_onnx.pipeline.report import ConvKernelTimes, MixedPrecisionReport
from gdws_onnx.runtime.bench import Ratio
from gdws_onnx.runtime.kernels import conv_kernels
from gdws_onnx.runtime.session import make_session


def _ratio(r: float) -> Ratio:
    return Ratio("b", "c", r, r - 0.01, r + 0.01, 1.0, r, ci_low=r - 0.02, ci_high=r + 0.02, rounds=40,
                 confidence=0.99)


class DocProbe:
    """Calls a candidate faster when its doc_string (the convs a fake quantizer left float) is in `fast`."""

    def __init__(self, fast: set[str]):
        self.fast, self.seen = fast, []

    def compare(self, baseline, candidate, threshold=None):
        self.seen.append((baseline.doc_string, candidate.doc_string))
        return _ratio(0.8 if candidate.doc_string in self.fast else 1.0)


def _tagged(names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.doc_string = ",".join(names)
    return m


def _calibration(n: int = 32, size: int = 12) -> np.ndarray:
    return np.random.default_rng(0).random((n, 3, size, size)).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = make_session(model, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_the_quantizer_leaves_the_named_convs_float():
    model, x = small_cnn(), _calibration()
    q = QuantizeInt8Pass(x, activation_type="uint8", exclude=("conv0",)).call(model)
    wrapped = {c.name: c.wrapped for c in int8_coverage(q.model).convs}
    assert wrapped == {"conv0": False, "conv1": True, "conv2": True}
    kernels = {k.name: k.op_type for k in conv_kernels(q.model).convs}
    assert kernels["conv0"] not in ("QLinearConv", "ConvInteger")
    assert kernels["conv1"] == kernels["conv2"] == "QLinearConv"
    assert "1 node(s) left float" in q.report.message
    a, b = _run(model, x[:8]), _run(q.model, x[:8])
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_the_screen_times_every_conv_in_both_models():
    model, x = small_cnn(), _calibration()
    q = QuantizeInt8Pass(x, activation_type="uint8").call(model).model
    times = mp.screen(model, q, batch=1, threads=1)
    assert [t.name for t in times] == ["conv0", "conv1", "conv2"]
    assert all(t.float_us > 0 and t.int8_us > 0 for t in times)
    report = MixedPrecisionReport(screened=[ConvKernelTimes("a", 10, 30), ConvKernelTimes("b", 10, 5),
                                               ConvKernelTimes("c", 10, 50)])
    assert [t.name for t in report.candidates] == ["c", "a"]  # slower in INT8 only, the largest loss first


def test_the_greedy_keeps_each_conv_only_while_the_model_measures_faster():
    probe = DocProbe(fast={"a"})
    all_int8 = _tagged([])
    model, kept, steps = mp.choose_float_convs(all_int8, ["a", "b", "c"], _tagged, {1: probe})
    assert kept == ["a"] and model.doc_string == "a"
    assert [(s.float_convs, s.kept) for s in steps] == [(["a"], True), (["a", "b"], False)]  # c never tried
    assert probe.seen == [("", "a"), ("a", "a,b")]  # each against the best so far


def test_a_kept_conv_grows_to_the_next_one_and_a_grown_refusal_ends_only_the_growth():
    follows = {"a": "x", "x": "y"}.get
    model, kept, steps = mp.choose_float_convs(_tagged([]), ["a", "b"], _tagged, {1: DocProbe({"a", "a,x", "a,x,b"})},
                                               following=follows)
    assert kept == ["a", "x", "b"] and model.doc_string == "a,x,b"
    assert [(s.float_convs[-1], s.after, s.kept) for s in steps] == [
        ("a", "", True), ("x", "a", True), ("y", "x", False), ("b", "", True)]
    # a screened candidate already taken by growth is not measured again
    _, kept, steps = mp.choose_float_convs(_tagged([]), ["a", "x"], _tagged, {1: DocProbe({"a", "a,x"})},
                                           following=follows)
    assert kept == ["a", "x"] and len(steps) == 3  # a, x (grown), y (grown, refused); x not again


def test_next_conv_follows_activations_and_stops_at_a_branch_or_another_op():
    model = small_cnn()
    assert mp.next_conv(model, "conv0") == "conv1" and mp.next_conv(model, "conv1") == "conv2"
    assert mp.next_conv(model, "conv2") is None  # global average pool next
    branch = onnx.helper.make_node("Identity", ["r0"], ["extra"], name="reads_r0")
    model.graph.node.append(branch)
    assert mp.next_conv(model, "conv0") is None  # relu0's output has two readers


def test_nothing_kept_gives_back_the_all_int8_model_itself():
    all_int8 = _tagged([])
    model, kept, steps = mp.choose_float_convs(all_int8, ["a", "b"], _tagged, {1: DocProbe(set()), 32: DocProbe({"a"})})
    assert model is all_int8 and kept == [] and len(steps) == 1 and not steps[0].kept  # every batch must be faster
    assert mp.choose_float_convs(all_int8, [], _tagged, {1: DocProbe({"a"})}) == (all_int8, [], [])


def test_another_ep_is_not_searched_and_says_why():
    model, x = small_cnn(), _calibration()
    q = QuantizeInt8Pass(x, activation_type="uint8").call(model).model
    out, report = mixed_step(model, q, lambda names: pytest.fail("nothing to quantize"),
                             TimingOptions(ep="cuda"), RunOptions())
    assert out is q and not report.float_convs and "EP is cuda" in report.summary()


class Always:
    def __init__(self, r: float):
        self.r = r

    def compare(self, baseline, candidate, threshold=None):
        return _ratio(self.r)


@pytest.fixture
def fixed_screen(monkeypatch):
    """The screen says conv0's INT8 kernel is 10x slower, conv1's 2 us slower, conv2's faster."""
    times = [ConvKernelTimes("conv0", 10.0, 100.0), ConvKernelTimes("conv1", 10.0, 12.0),
             ConvKernelTimes("conv2", 10.0, 5.0)]
    monkeypatch.setattr(mp, "screen", lambda *a, **k: times)


@pytest.mark.parametrize("ratio,float_convs", [(0.8, ["conv0", "conv1", "conv2"]), (1.0, [])])
def test_optimize_leaves_float_only_what_measured_faster(tmp_path, fixed_screen, ratio, float_convs):
    np.savez(tmp_path / "x.npz", x=_calibration())
    model = small_cnn()
    out, report = optimize(model, conv="off", quantize="int8", data=str(tmp_path / "x.npz"), target="macs",
                           probe_factory=lambda b, kind: Always(ratio), threads=1)
    mixed = report.quantize.mixed_precision
    assert mixed.float_convs == float_convs
    assert [c.name for c in mixed.candidates] == ["conv0", "conv1"]
    kernels = {k.name: k.int8 for k in conv_kernels(out).convs}
    assert [n for n, int8 in kernels.items() if not int8] == float_convs
    assert [c["name"] for c in report.quantize.int8_kernels["not_int8"]] == float_convs
    assert report.verification.ran and report.verification.passed
    d = report.to_dict()["quantize"]["mixed_precision"]
    # conv0 (screened), then conv1 and conv2 grown after it; conv1's own screen entry is not tried again
    assert d["float_convs"] == float_convs and len(d["steps"]) == (3 if float_convs else 1)
    json.dumps(report.to_dict(), default=str)
    if float_convs:
        assert "3 conv(s) left float, each measured against the model before it: conv0 (INT8 kernel 100 us, " \
               "float 10 us) b1 0.800 [0.780-0.820]; conv1 (after conv0; " in mixed.summary()
        assert "3 conv(s) left float (measured faster)" in report.quantize.method
    else:
        assert "conv0 float was not measurably faster" in mixed.summary()


def test_optimize_without_mixed_precision_quantizes_every_conv(tmp_path, fixed_screen):
    np.savez(tmp_path / "x.npz", x=_calibration())
    out, report = optimize(small_cnn(), conv="off", quantize="int8", data=str(tmp_path / "x.npz"), target="macs",
                           probe_factory=lambda b, kind: Always(0.5), mixed_precision=False)
    assert report.quantize.mixed_precision is None
    assert all(k.int8 for k in conv_kernels(out).convs)
    assert report.to_dict()["quantize"]["mixed_precision"] is None


def test_cli_prints_the_mixed_precision_line_and_can_turn_it_off(runner, cnn_path, tmp_path):
    np.savez(tmp_path / "x.npz", x=_calibration())
    for flag, line in (([], True), (["--no-mixed-precision"], False)):
        out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
        r = runner.invoke(main, ["optimize", cnn_path, "-o", str(out), "--conv", "off", "--quantize", "int8",
                                 "--data", str(tmp_path / "x.npz"), "--report", str(rep), "--target", "macs",
                                 "--threads", "1", *flag])
        assert r.exit_code == 0, r.output
        assert ("mixed precision:" in r.output) is line
        q = json.loads(rep.read_text())
        assert (q["quantize"]["mixed_precision"] is not None) is line
        assert q["options"]["mixed_precision"] is line
