"""Latency-aware allocation with injected timing (never timed tests): the layer cache, the
multiple-choice allocation, the never-slower fallback, EP errors, interleaving order."""

import itertools
import json

import numpy as np
import onnx
import pytest
from builders import small_cnn

from gdws_onnx import allocate, bench, optimize
from gdws_onnx.bench import Ratio
from gdws_onnx.cli import main
from gdws_onnx.errors import GDWSError
from gdws_onnx.providers import configure, parse_eps


def _cost(model: onnx.ModelProto) -> float:
    """A fake latency: weight elements of every Conv plus a fixed price per Gather."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes.get(n.input[1], 0) if n.op_type == "Conv" else 300.0 * (n.op_type == "Gather")
               for n in model.graph.node) + 100.0


class FakeProbe:
    """Deterministic 'measurements'; `slow_layers` make any whole model containing them slower."""

    def __init__(self, kind, slow_layers=(), layer_ratio=None):
        self.kind, self.slow, self.layer_ratio, self.calls = kind, set(slow_layers), layer_ratio, 0

    def compare(self, baseline, candidate):
        self.calls += 1
        b, c = _cost(baseline), _cost(candidate)
        layers = {n.name.split("/gdws/")[0] for n in candidate.graph.node if "/gdws/" in n.name}
        if self.kind == "model" and layers & self.slow:
            c = 1.5 * b
        if self.kind == "layer" and self.layer_ratio and layers & set(self.layer_ratio):
            c = b * self.layer_ratio[next(iter(layers & set(self.layer_ratio)))]
        return Ratio("baseline", "candidate", c / b, c / b, c / b, b / 1000, c / 1000)


def _model():
    return small_cnn(channels=(16, 32, 32, 32), size=8)


def _factory(probes):
    def make(batch, kind):
        args = probes.get("args", {}) if kind == "model" else probes.get("layer_args", {})
        probes.setdefault(kind, []).append(FakeProbe(kind, **args))
        return probes[kind][-1]
    return make


def test_latency_target_with_error_budget_keeps_only_faster_layers(tmp_path):
    probes = {}
    out, report = optimize(_model(), target="latency", error_budget=0.3, cache=str(tmp_path / "c.json"),
                           probe_factory=_factory(probes), verify=False)
    rewritten = [layer for layer in report.layers if layer.status == "rewritten"]
    assert rewritten and all(max(layer.measured_ratio.values()) < 0.95 for layer in rewritten)
    assert report.latency["faster"] and report.latency["final_ratios"]
    assert all(r["median"] < 1 for r in report.latency["final_ratios"].values())


def test_cache_is_reused_and_keyed_by_batch(tmp_path):
    cache = str(tmp_path / "c.json")
    probes = {}
    optimize(_model(), target="latency", error_budget=0.3, cache=cache, probe_factory=_factory(probes), verify=False)
    first_calls = probes["layer"][-1].calls
    assert first_calls > 0 and json.load(open(cache))
    probes2 = {}
    _, report = optimize(_model(), target="latency", error_budget=0.3, cache=cache,
                         probe_factory=_factory(probes2), verify=False)
    assert probes2["layer"][-1].calls == 0 and report.latency["cache"]["misses"] == 0
    probes3 = {}
    _, report = optimize(_model(), target="latency", error_budget=0.3, cache=cache, batches=[4],
                         probe_factory=_factory(probes3), verify=False)
    assert probes3["layer"][-1].calls > 0  # another batch is another measurement


def test_never_slower_reverts_the_layer_that_hurts(tmp_path):
    """conv3 measures barely faster alone (worst layer ratio) but slows the whole model."""
    probes = {"args": {"slow_layers": {"conv3"}}, "layer_args": {"layer_ratio": {"conv3": 0.9}}}
    out, report = optimize(_model(), target="latency", error_budget=0.5, cache="",
                           probe_factory=_factory(probes), verify=False)
    status = {layer.name: (layer.status, layer.reason) for layer in report.layers}
    assert status["conv3"][0] == "skipped" and "reverted" in status["conv3"][1]
    assert report.latency["faster"]
    assert len(report.latency["checks"]) >= 2 and report.latency["checks"][0]["reverted"]
    assert not any(n.name.startswith("conv3/gdws") for n in out.graph.node)


def test_never_slower_returns_the_original_when_nothing_helps(tmp_path):
    probes = {"args": {"slow_layers": {"conv1", "conv2", "conv3"}}}
    original = _model()
    out, report = optimize(original, target="latency", error_budget=0.5, cache="",
                           probe_factory=_factory(probes), verify=False)
    assert not report.rewritten and not report.latency["faster"]
    assert "unchanged" in report.latency["message"]
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in original.graph.node]


def test_latency_budget_search_meets_the_target(tmp_path):
    probes = {}
    _, report = optimize(_model(), target="latency", latency_reduction=1.5, cache="",
                         probe_factory=_factory(probes), verify=False)
    assert report.budget.mode == "latency" and report.budget.met, report.budget
    assert report.latency["final_ratios"] and max(r["median"] for r in report.latency["final_ratios"].values()) <= 1 / 1.5


@pytest.mark.parametrize("seed", range(6))
def test_choose_options_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers = [[(0.0, 0.0)] + [(float(rng.uniform(0, 5)), float(rng.uniform(0, 10))) for _ in range(3)]
              for _ in range(4)]
    required = float(rng.uniform(2, 12))
    choice, met = allocate.choose_options(layers, required, bins=2000)
    feasible = [c for c in itertools.product(range(4), repeat=4)
                if sum(layers[i][j][0] for i, j in enumerate(c)) >= required]
    assert met == bool(feasible)
    if feasible:
        best = min(sum(layers[i][j][1] for i, j in enumerate(c)) for c in feasible)
        got = sum(layers[i][j][1] for i, j in enumerate(choice))
        saving = sum(layers[i][j][0] for i, j in enumerate(choice))
        assert saving >= required - 4 * required / 2000 and got <= best + 1e-9


def test_interleave_alternates_who_goes_first():
    order = []
    runners = [lambda: order.append("a"), lambda: order.append("b")]
    times = bench.interleave(runners, warmup=1, runs=4, timer=lambda fn: (fn(), 1.0)[1])
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(t) for t in times] == [4, 4]


def test_ratio_is_the_median_of_paired_rounds():
    r = bench.ratio("a", "b", [1.0, 2.0, 4.0], [2.0, 2.0, 2.0])
    assert r.median == 1.0 and r.p10 < r.median < r.p90


def test_missing_or_unknown_ep_is_a_clear_error(runner, cnn_path):
    with pytest.raises(GDWSError, match="unknown execution provider"):
        parse_eps("cpu,tpu")
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(GDWSError, match="pip install onnxruntime-gpu"):
            configure(ort.SessionOptions(), "cuda")
        r = runner.invoke(main, ["bench", cnn_path, "--ep", "cuda"])
        assert r.exit_code == 2 and "onnxruntime-gpu" in r.output


def test_bench_cli_reports_interleaved_ratios_and_profile(runner, cnn_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert runner.invoke(main, ["optimize", cnn_path, "-o", str(out), "--error-budget", "0.3", "-q"]).exit_code == 0
    rep = tmp_path / "b.json"
    r = runner.invoke(main, ["bench", cnn_path, str(out), "--batch", "1,2", "--runs", "3", "--warmup", "1",
                             "--profile", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    data = json.loads(rep.read_text())
    assert [x["batch"] for x in data["runs"]] == [1, 2]
    assert data["runs"][0]["environment"]["spinning"] == "off"
    layers = {row["conv"] for row in data["profile"]["layers"]}
    assert {"conv1", "conv2"} <= layers  # GDWS nodes map back to the original conv names


def test_realizations_measure_rounded_widths_and_the_multiplier_form():
    """Each rank choice is measured at its own width G, at G rounded up to multiples of 8 and 16
    (more terms, so no more error), and without a Gather; none costs more MACs than the conv."""
    from gdws_onnx import decompose, latency

    rng = np.random.default_rng(3)
    spec = decompose.spectrum(rng.standard_normal((64, 32, 3, 3)).astype(np.float32))
    sc = decompose.scores(spec, np.ones(32))
    ranks = allocate.mego(sc, 45)
    forms = latency.realizations(spec, sc, ranks)
    widths = [int(r.sum()) for r, mult in forms if not mult]
    assert widths == [45, 48]  # 16 rounds 45 to 48 too: measured once
    assert any(mult for _, mult in forms)
    errors = [decompose.weighted_error(spec, r, np.ones(32)) for r, mult in forms if not mult]
    assert errors == sorted(errors, reverse=True)
    original = decompose.original_cost_per_pixel(spec)
    assert all((decompose.multiplier_cost_per_pixel if m else decompose.gdws_cost_per_pixel)(spec, r) < original
               for r, m in forms)


def test_openvino_errors_name_the_package_or_the_vendor_filter(monkeypatch):
    import sys
    import types

    import onnxruntime as ort

    from gdws_onnx import providers

    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # not installed
    with pytest.raises(GDWSError, match="pip install onnxruntime-ep-openvino"):
        configure(ort.SessionOptions(), "openvino")
    fake = types.SimpleNamespace(get_ep_name=lambda: "OpenVINOExecutionProvider", get_library_path=lambda: "x.so")
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", fake)
    monkeypatch.setattr(ort, "register_execution_provider_library", lambda name, path: None)
    monkeypatch.setattr(ort, "get_ep_devices", lambda: [])
    monkeypatch.setattr(providers, "_cpu_vendor", lambda: "AuthenticAMD")
    with pytest.raises(GDWSError, match="Intel hardware only and this CPU is AuthenticAMD"):
        configure(ort.SessionOptions(), "openvino")
