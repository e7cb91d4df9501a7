"""Latency-aware allocation with injected timing (never timed tests): the layer cache, the
multiple-choice allocation, the never-slower fallback, EP errors, interleaving order."""

import io
import itertools
import json
import re

import numpy as np
import onnx
import pytest
from builders import small_cnn

from gdws_onnx.core import allocate
from gdws_onnx.runtime import bench
from gdws_onnx import optimize
from gdws_onnx.runtime.bench import Ratio
from gdws_onnx.cli import main
from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.pattern import is_gdws_node, layer_of
from gdws_onnx.runtime.providers import configure, parse_eps


def _cost(model: onnx.ModelProto, gather_price: float = 300.0) -> float:
    """A fake latency: weight elements of every Conv plus a fixed price per Gather."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes.get(n.input[1], 0) if n.op_type == "Conv" else gather_price * (n.op_type == "Gather")
               for n in model.graph.node) + 100.0


def _gdws_layers(model: onnx.ModelProto) -> set[str]:
    return {layer_of(n.name) for n in model.graph.node if is_gdws_node(n)}


def fake_compare(base: float, cand: float, spread: float, threshold, seed: int, max_rounds: int = 320,
                 runs: int = 20) -> Ratio:
    """The real adaptive loop (bench.compare_until) with an injected timer: round times are the
    fake costs times lognormal noise of sigma `spread`, so per-round ratios have median cand/base."""
    rng = np.random.default_rng(seed)
    cost = [base, cand]
    runners = [lambda: 0, lambda: 1]
    return bench.compare_until(runners, threshold, bench.BenchConfig(runs=runs, warmup=0),
                               bench.Rounds(max_rounds=max_rounds, max_seconds=1e9),
                               timer=lambda fn: cost[fn()] * float(np.exp(rng.normal(0, spread))))


class FakeProbe:
    """Seeded 'measurements' through the real adaptive loop. `slow_layers` make any whole model
    containing them 1.5x slower; `layer_ratio` {layer: median or (median, spread)} sets a
    layer's GDWS / original ratio; `gather_price` what a Gather costs a whole model."""

    def __init__(self, kind, slow_layers=(), layer_ratio=None, spread=0.02, gather_price=300.0):
        self.kind, self.slow, self.layer_ratio = kind, set(slow_layers), layer_ratio or {}
        self.spread, self.gather_price = spread, gather_price
        self.calls, self.thresholds, self.results = 0, [], []

    def compare(self, baseline, candidate, threshold=None):
        self.calls += 1
        self.thresholds.append(threshold)
        b, c = _cost(baseline, self.gather_price), _cost(candidate, self.gather_price)
        layers, spread = _gdws_layers(candidate), self.spread
        if self.kind == "model" and layers & self.slow:
            c = 1.5 * b
        hit = sorted(layers & set(self.layer_ratio)) if self.kind == "layer" else []
        if hit:
            spec = self.layer_ratio[hit[0]]
            median, spread = spec if isinstance(spec, tuple) else (spec, spread)
            c = b * median
        r = fake_compare(b, c, spread, threshold, seed=self.calls)
        self.results.append((sorted(layers), r))
        return r


def _model():
    return small_cnn(channels=(16, 32, 32, 32), size=8)


def _factory(probes):
    def make(batch, kind):
        args = probes.get("args", {}) if kind == "model" else probes.get("layer_args", {})
        probes.setdefault(kind, []).append(FakeProbe(kind, **args))
        return probes[kind][-1]
    return make


def test_median_ci_is_an_order_statistic_interval_with_its_coverage():
    x = np.arange(20.0)
    assert bench.median_ci(x, 0.95) == (5.0, 14.0)  # x_(6), x_(15): P(Bin(20, 1/2) <= 5) = 0.0207
    assert bench.median_ci(np.arange(5.0), 0.95) == (0.0, float("inf"))  # n < 6: no 95 % interval
    rng = np.random.default_rng(0)
    covered = [lo <= 1.0 <= hi for lo, hi in (bench.median_ci(rng.lognormal(0, 1, 25), 0.95) for _ in range(2000))]
    assert 0.94 <= np.mean(covered) <= 0.99  # exact coverage for n = 25 is 0.957


def test_adaptive_comparison_decides_or_says_undecided():
    clearly_faster = fake_compare(1000.0, 800.0, 0.05, 0.95, seed=1)
    assert bench.verdict(clearly_faster, 0.95) == "below" and clearly_faster.rounds == 20  # decided at once
    clearly_slower = fake_compare(1000.0, 1200.0, 0.05, 0.95, seed=2)
    assert bench.verdict(clearly_slower, 0.95) == "above" and clearly_slower.rounds == 20
    close = fake_compare(1000.0, 900.0, 0.1, 0.95, seed=3)  # needs more rounds, then decides
    assert close.rounds > 20 and bench.verdict(close, 0.95) == "below"
    straddling = fake_compare(1000.0, 950.0, 0.3, 0.95, seed=4)  # median on the threshold, wide spread
    assert straddling.rounds == 320 and bench.verdict(straddling, 0.95) == "undecided"
    assert bench.format_ratio(straddling).startswith(f"{straddling.median:.2f} [")


def test_adaptive_looks_keep_the_false_faster_rate_within_the_confidence():
    """True median exactly at the threshold: over all its looks, a comparison calls it faster
    at most (1 - 0.95) / 2 of the time (Bonferroni over looks)."""
    calls = [bench.verdict(fake_compare(1000.0, 950.0, 0.3, 0.95, seed=s, max_rounds=160), 0.95) == "below"
             for s in range(400)]
    assert np.mean(calls) <= 0.04


def test_latency_target_keeps_layers_measurably_faster_within_the_error_budget(tmp_path):
    """conv1 is clearly faster, conv2 clearly slower, conv3 straddles the threshold: only conv1 may
    be rewritten, within the error budget, and budget.achieved is that error, not a MAC ratio."""
    probes = {"layer_args": {"layer_ratio": {"conv1": (0.6, 0.05), "conv2": (1.3, 0.05), "conv3": (0.95, 0.3)}}}
    out, report = optimize(_model(), conv="gdws", target="latency", error_budget=0.3, cache=str(tmp_path / "c.json"),
                           probe_factory=_factory(probes), verify=False)
    status = {layer.name: layer for layer in report.layers}
    assert status["conv1"].status == "rewritten" and max(status["conv1"].measured_ratio.values()) < 0.95
    assert status["conv2"].status == "skipped" and "not measurably faster" in status["conv2"].reason
    assert status["conv3"].status == "skipped" and "not measurably faster" in status["conv3"].reason
    assert all(layer.relative_error <= 0.3 for layer in report.rewritten)
    assert report.budget.mode == "error" and report.budget.achieved == max(x.relative_error for x in report.rewritten)
    assert report.budget.achieved != report.mac_reduction
    conv3 = [r for layers, r in probes["layer"][0].results if layers == ["conv3"]]
    assert conv3 and all(bench.verdict(r, 0.95) != "below" for r in conv3)  # inconclusive, never called faster
    assert any(r.rounds > 20 for r in conv3)  # rounds were added before giving up
    assert report.latency["faster"] and all(bench.verdict(bench.ratio_of(r), 1.0) == "below"
                                            for r in report.latency["final_ratios"].values())
    assert set(probes["layer"][0].thresholds) == {0.95} and set(probes["model"][0].thresholds) <= {1.0, (1.0,)}
    assert _gdws_layers(out) == {"conv1"}


def test_cache_keeps_the_interval_and_remeasures_what_did_not_decide(tmp_path):
    cache = str(tmp_path / "c.json")
    probes = {"layer_args": {"layer_ratio": {"conv3": (0.95, 0.3)}}}
    optimize(_model(), conv="gdws", target="latency", error_budget=0.3, cache=cache, probe_factory=_factory(probes), verify=False)
    first_calls = probes["layer"][-1].calls
    entries = json.load(open(cache))
    assert first_calls == len(entries) > 0
    assert all({"median", "p10", "p90", "ci_low", "ci_high", "rounds"} <= set(e) for e in entries.values())
    undecided = [e for e in entries.values() if bench.verdict(bench.ratio_of(e), 0.95) == "undecided"]
    assert undecided  # conv3's
    probes2 = {"layer_args": probes["layer_args"]}
    _, report = optimize(_model(), conv="gdws", target="latency", error_budget=0.3, cache=cache,
                         probe_factory=_factory(probes2), verify=False)
    assert probes2["layer"][-1].calls == len(undecided) == report.latency["cache"]["misses"]
    assert all(layers == ["conv3"] for layers, _ in probes2["layer"][-1].results)
    legacy = {k: {"ratio": e["median"], "baseline_ms": 1.0, "candidate_ms": 0.5} for k, e in entries.items()}
    json.dump(legacy, open(cache, "w"))  # entries without their spread are measured again
    probes3 = {}
    optimize(_model(), conv="gdws", target="latency", error_budget=0.3, cache=cache, probe_factory=_factory(probes3), verify=False)
    assert probes3["layer"][-1].calls == len(entries)
    probes4 = {}
    _, report = optimize(_model(), conv="gdws", target="latency", error_budget=0.3, cache=cache, batches=[4],
                         probe_factory=_factory(probes4), verify=False)
    assert probes4["layer"][-1].calls > 0  # another batch is another measurement


def test_never_slower_reverts_the_layer_that_hurts(tmp_path):
    """conv3 measures barely faster alone (worst layer ratio) but slows the whole model."""
    probes = {"args": {"slow_layers": {"conv3"}}, "layer_args": {"layer_ratio": {"conv3": 0.9}}}
    out, report = optimize(_model(), conv="gdws", target="latency", error_budget=0.5, cache="",
                           probe_factory=_factory(probes), verify=False)
    status = {layer.name: (layer.status, layer.reason) for layer in report.layers}
    assert status["conv3"][0] == "skipped" and "reverted" in status["conv3"][1]
    assert report.latency["faster"]
    assert len(report.latency["checks"]) >= 2 and report.latency["checks"][0]["reverted"]
    assert not any(n.name.startswith("conv3/gdws") for n in out.graph.node)


def test_never_slower_returns_the_original_when_nothing_helps(tmp_path):
    probes = {"args": {"slow_layers": {"conv1", "conv2", "conv3"}}}
    original = _model()
    out, report = optimize(original, conv="gdws", target="latency", error_budget=0.5, cache="",
                           probe_factory=_factory(probes), verify=False)
    assert not report.rewritten and not report.latency["faster"]
    assert "unchanged" in report.latency["message"]
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in original.graph.node]


def test_a_whole_model_that_does_not_measure_faster_is_not_kept(tmp_path):
    """Whole-model ratios that straddle 1 (median below it) are 'not measurably faster'."""
    class Straddling(FakeProbe):
        def compare(self, baseline, candidate, threshold=None):
            self.calls += 1
            b = _cost(baseline)
            return fake_compare(b, 0.98 * b, 0.4, threshold, seed=self.calls, max_rounds=40)

    original = _model()
    out, report = optimize(original, conv="gdws", target="latency", error_budget=0.5, cache="", verify=False,
                           probe_factory=lambda b, kind: FakeProbe(kind) if kind == "layer" else Straddling(kind))
    assert report.latency["checks"] and not report.latency["faster"] and not report.rewritten
    assert all(step["reverted"] for step in report.latency["checks"])
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in original.graph.node]


def test_latency_budget_search_meets_the_target(tmp_path):
    probes = {}
    _, report = optimize(_model(), target="latency", latency_reduction=1.5, cache="",
                         probe_factory=_factory(probes), verify=False)
    # whole-model checks settle both "faster" (1) and the budget (1 / 1.5)
    assert (1.0, 1 / 1.5) in probes["model"][0].thresholds
    assert report.budget.mode == "latency" and report.budget.met, report.budget
    final = report.latency["final_ratios"]
    assert final and all(bench.verdict(bench.ratio_of(r), 1 / 1.5) == "below" for r in final.values())
    # achieved is the measured speed-up (what the latency budget measures), not the MAC ratio
    assert report.budget.achieved == pytest.approx(1 / max(r["median"] for r in final.values()))
    assert report.budget.achieved == report.latency["speedup"] != report.mac_reduction
    assert report.to_dict()["summary"]["mac_reduction"] == report.mac_reduction


def test_budget_achieved_is_in_the_budget_s_unit():
    _, rep = optimize(_model(), mac_reduction=1.3, verify=False, target="macs")
    assert rep.budget.achieved == rep.mac_reduction >= 1.3 * (1 - 1e-3)
    _, rep = optimize(_model(), error_budget=0.2, verify=False, target="macs")
    assert rep.budget.achieved == max(x.relative_error for x in rep.rewritten) <= 0.2


def test_table_and_latency_lines_use_one_ratio_convention(tmp_path):
    """Ratios are GDWS / original everywhere (the caption says so); a producer widened by a fold
    says so on its row; '1 layer', not '1 layers'."""
    from rich.console import Console

    from gdws_onnx.cli.render import latency_lines, optimize_table

    probes = {"args": {"gather_price": 2000.0},  # Gathers are dear: folding them wins
              "layer_args": {"layer_ratio": {"conv1": 0.5, "conv2": 1.2, "conv3": 1.2}}}
    _, report = optimize(_model(), conv="gdws", target="latency", error_budget=0.5, cache="", verify=False,
                         probe_factory=_factory(probes))
    assert report.latency["folded"] == ["conv1"]
    console = Console(file=io.StringIO(), width=400)
    console.print(optimize_table(report))
    text = console.file.getvalue()
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    assert "rewritten / original latency" in text and "measured x" not in text
    assert re.search(r"rewritten \(.*Gather folded into conv0\), layer ratio 0\.\d\d \[0\.\d\d-0\.\d\d\]",
                     rows["conv1"])
    assert re.search(r"skipped: not measurably faster on cpu \(best layer ratio 1\.\d\d \[1\.\d\d-1\.\d\d\]\)",
                     rows["conv2"])
    assert "skipped: first conv" in rows["conv0"] and "output channels changed: conv1's Gather folded" in rows["conv0"]
    assert not any("output channels changed" in rows[n] for n in ("conv1", "conv2", "conv3"))
    lines = latency_lines(report.latency)
    assert any(line.startswith("  1 layer rewritten:") for line in lines)
    assert not any("1 layers" in line for line in lines)
    assert any("-> folded" in line for line in lines)
    assert any(line.startswith("  with 1 Gather folded: optimized/original batch 1: 0.") for line in lines)


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
    assert r.rounds == 3 and (r.ci_low, r.ci_high) == (None, None)  # too few rounds to bound the median
    assert r.bounds() == (0.0, float("inf")) and bench.verdict(r, 1.5) == "undecided"
    hand_built = Ratio("a", "b", 0.5, 0.4, 0.6)  # no rounds: judged by its spread
    assert hand_built.bounds() == (0.4, 0.6) and bench.verdict(hand_built, 0.95) == "below"


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
    assert runner.invoke(main, ["optimize", cnn_path, "-o", str(out), "--error-budget", "0.3", "-q", "--target", "macs"]).exit_code == 0
    rep = tmp_path / "b.json"
    r = runner.invoke(main, ["bench", cnn_path, str(out), "--batch", "1,2", "--runs", "3", "--warmup", "1",
                             "--profile", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    data = json.loads(rep.read_text())
    assert [x["batch"] for x in data["runs"]] == [1, 2]
    assert data["runs"][0]["environment"]["spinning"] == "off"
    layers = {row["conv"] for row in data["profile"]["layers"]}
    assert {"conv1", "conv2"} <= layers  # GDWS nodes map back to the original conv names


def test_realizations_measure_rounded_widths_and_the_padded_forms():
    """Each rank choice is measured at its own width G, at G rounded up to multiples of 8 and 16
    (more terms, so no more error), and without a Gather (channel multiplier, and stacked for an
    ungrouped conv); none costs more MACs than the conv."""
    from gdws_onnx.core import decompose
    from gdws_onnx.pipeline import latency

    rng = np.random.default_rng(3)
    spec = decompose.spectrum(rng.standard_normal((64, 32, 3, 3)).astype(np.float32))
    sc = decompose.scores(spec, np.ones(32))
    ranks = allocate.mego(sc, 45)
    forms = latency.realizations(spec, sc, ranks)
    widths = [int(r.sum()) for r, form in forms if form == "gather"]
    assert widths == [45, 48]  # 16 rounds 45 to 48 too: measured once
    assert [form for _, form in forms if form != "gather"] == ["multiplier", "stacked"]
    errors = [decompose.weighted_error(spec, r, np.ones(32)) for r, form in forms if form == "gather"]
    assert errors == sorted(errors, reverse=True)
    original = decompose.original_cost_per_pixel(spec)
    assert all((decompose.gdws_cost_per_pixel if f == "gather" else decompose.multiplier_cost_per_pixel)(spec, r)
               < original for r, f in forms)
    grouped = decompose.spectrum(rng.standard_normal((64, 16, 3, 3)).astype(np.float32), 2)
    assert latency.padded_forms(grouped) == ("multiplier",)  # the stacked form needs an ungrouped conv


def test_cache_keys_of_the_older_forms_are_unchanged():
    from gdws_onnx.graph.convs import find_convs
    from gdws_onnx.pipeline.measure import LatencyCache

    site = find_convs(_model())[1]
    env = {"ep": "cpu"}
    assert LatencyCache.key(site, (8, True), 1, env) == LatencyCache.key(site, (8, "multiplier"), 1, env)
    assert LatencyCache.key(site, (8, False), 1, env) == LatencyCache.key(site, (8, "gather"), 1, env)
    assert LatencyCache.key(site, (8, "stacked"), 1, env) != LatencyCache.key(site, (8, "multiplier"), 1, env)


def test_openvino_errors_name_the_package_or_the_vendor_filter(monkeypatch):
    import sys
    import types

    import onnxruntime as ort

    from gdws_onnx.runtime import providers

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


def test_max_rounds_and_measure_seconds_are_checked(runner, cnn_path, tmp_path):
    out = tmp_path / "o.onnx"
    for flag, value in (("--max-rounds", "0"), ("--measure-seconds", "0")):
        r = runner.invoke(main, ["optimize", cnn_path, "-o", str(out), "--target", "latency", flag, value])
        assert r.exit_code == 2 and flag in r.output and not out.exists()


def test_latency_plan_returns_the_budget_and_a_typed_latency_report():
    """`latency.plan` (the planner of target latency) sets the choice on the candidates and returns
    a BudgetPlan: the budget asked for and a LatencyReport of what was measured."""
    from gdws_onnx.core import decompose
    from gdws_onnx.graph.convs import find_convs
    from gdws_onnx.pipeline import latency
    from gdws_onnx.pipeline.candidates import BudgetPlan, Candidate
    from gdws_onnx.pipeline.options import BudgetOptions, RunOptions, TimingOptions
    from gdws_onnx.pipeline.report import LatencyReport

    model = _model()
    sites = [s for s in find_convs(model) if s.name in ("conv1", "conv2")]
    cands = [Candidate(s, decompose.spectrum(s.weight, s.group), np.ones(s.in_channels)) for s in sites]
    probes = {"layer_args": {"layer_ratio": {"conv1": (0.6, 0.05), "conv2": (1.3, 0.05)}}}
    plan = latency.plan(cands, model, BudgetOptions(target="latency", error_budget=0.3),
                        TimingOptions(cache="", probe_factory=_factory(probes)), RunOptions())
    assert isinstance(plan, BudgetPlan) and isinstance(plan.latency, LatencyReport)
    assert (plan.budget.mode, plan.budget.target) == ("error", 0.3)
    conv1, conv2 = cands
    assert conv1.ranks is not None and not conv1.reason and max(conv1.measured_ratio.values()) < 0.95
    assert "not measurably faster" in conv2.reason
    report = plan.latency
    assert report.layers["conv1"]["chosen"] is not None and report.layers["conv2"]["chosen"] is None
    assert report.faster and report.speedup > 1 and report.message == ""
    d = report.to_dict()
    assert d["layers"] == report.layers and isinstance(d["checks"][0], dict) and d["checks"][0]["rewritten"] == ["conv1"]


def test_mismatch_budget_under_target_latency_keeps_the_allocated_ranks_where_faster(tmp_path):
    """--mismatch-budget with --target latency: the mismatch allocation fixes the ranks; only their
    realizations are timed; a layer with no measurably faster form is left dense and the budget is
    allocated again over the others (fewer terms there); the budget is still mismatch, and met."""
    from gdws_onnx.graph.convs import find_convs

    model = small_cnn(channels=(16, 32, 48, 64), size=8)  # distinct geometries: no shared cache entries
    names = [s.name for s in find_convs(model)][1:]
    rng = np.random.default_rng(0)
    alphas = {s.name: 1e-3 * (rng.random(s.in_channels) + 0.5) for s in find_convs(model)[1:]}
    _, by_macs = optimize(model, mismatch_budget=0.05, alphas=alphas, verify=False, target="macs")
    allocated = {layer.name: layer.total_rank for layer in by_macs.rewritten}
    assert allocated, "the allocation rewrites some layer"
    slow = names[-1]
    probes = {"layer_args": {"layer_ratio": {**{n: (0.6, 0.05) for n in names}, slow: (1.3, 0.05)}}}
    out, report = optimize(model, target="latency", mismatch_budget=0.05, alphas=alphas,
                           cache=str(tmp_path / "c.json"), probe_factory=_factory(probes))
    status = {layer.name: layer for layer in report.layers}
    kept = {n for n in allocated if n != slow}
    assert {layer.name for layer in report.rewritten} == kept
    for n in kept:
        assert status[n].total_rank <= allocated[n]  # the slow layer's share of the budget moved here
        assert max(status[n].measured_ratio.values()) < 0.95
    assert slow in allocated and "not measurably faster" in status[slow].reason
    assert "the accuracy budget went to the other layers" in status[slow].reason
    assert slow in report.latency["layers"]  # its measurements are reported
    assert report.budget.mode == "mismatch" and report.budget.target == 0.05
    assert report.budget.achieved <= 0.05
    assert report.verification.passed
    assert _gdws_layers(out) == kept


def test_mismatch_budget_with_a_latency_table_is_refused(tmp_path):
    with pytest.raises(GDWSError, match="latency_table"):
        optimize(_model(), target="latency", mismatch_budget=0.05, alphas={}, latency_table=str(tmp_path / "t.json"))


def test_nchwc_block_size_follows_the_cpu_flags():
    assert bench.nchwc_block_size("fpu sse2 avx avx2 fma avx512f avx512bw") == 16
    assert bench.nchwc_block_size("fpu sse2 avx avx2 fma") == 8
    assert bench.nchwc_block_size("fp asimd") is None
    env = bench.environment(bench.BenchConfig(ep="cpu"))
    assert env["nchwc_block"] == bench.nchwc_block_size()
    assert "nchwc_block" not in bench.environment(bench.BenchConfig(ep="cuda"))


def test_speedup_per_mac_cut_of_a_rewritten_layer(tmp_path):
    probes = {"layer_args": {"layer_ratio": {"conv1": (0.6, 0.05)}}}
    _, report = optimize(_model(), conv="gdws", target="latency", error_budget=0.3, cache=str(tmp_path / "c.json"),
                         probe_factory=_factory(probes), verify=False)
    (layer,) = [x for x in report.rewritten if x.name == "conv1"]
    cut = layer.macs_per_pixel_before / layer.macs_per_pixel_after
    assert layer.speedup_per_mac_cut == pytest.approx(1 / max(layer.measured_ratio.values()) / cut)
    assert json.loads(report.to_json())["layers"][[x.name for x in report.layers].index("conv1")][
        "speedup_per_mac_cut"] == pytest.approx(layer.speedup_per_mac_cut)
    assert all(x.speedup_per_mac_cut is None for x in report.layers if x.status != "rewritten")
