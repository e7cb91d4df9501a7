"""`optimize --fc kronecker|lowrank --target latency`: FC layers kept only where measured faster
(pipeline/fc_latency.py), with injected probes (no timed tests)."""

import json

import numpy as np
import onnx
import pytest
from test_fc_pipeline import logits, mlp

from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.errors import OptionError
from gdws_onnx.graph.fc import fc_layer_model, find_fc_sites, plan_fc
from gdws_onnx.graph.pattern import layer_of, role_of
from gdws_onnx.pipeline import fc_latency
from gdws_onnx.runtime.bench import Ratio

SHAPES = {"x": [4, 64]}


def ratio(median: float, half_width: float) -> Ratio:
    """A measured ratio whose 95 % interval of the median is median +- half_width."""
    return Ratio("dense", "factored", median, median - half_width, median + half_width, 1.0, median,
                 median - half_width, median + half_width, 20, 0.95)


def fc_layers(model: onnx.ModelProto) -> dict[str, str]:
    """FC layer -> the scheme its nodes were rewritten by ('lowrank' or 'kron')."""
    return {layer_of(n.name): scope for n in model.graph.node for scope in ("lowrank", "kron")
            if role_of(n.name, scope) is not None}


class FakeProbe:
    """Layer probes return `layers[(layer, scheme)]` for a layer model rewritten by that scheme;
    model probes return `model(rewritten FC layers)`. Every call is recorded."""

    def __init__(self, kind, layers, model):
        self.kind, self.layers, self.model, self.calls = kind, layers, model, []

    def compare(self, baseline, candidate, threshold=None):
        rewritten = fc_layers(candidate)
        assert not fc_layers(baseline)  # the baseline is the dense layer, or the model without FC rewrites
        self.calls.append((sorted(rewritten.items()), threshold))
        if self.kind == "layer":
            assert len(rewritten) == 1 and len(candidate.graph.node) > 1
            (layer, scope), = rewritten.items()
            return self.layers[(layer, "kronecker" if scope == "kron" else "lowrank")]
        return self.model(set(rewritten))


def factory(layers, model=lambda rewritten: ratio(0.9, 0.02), made=None):
    made = [] if made is None else made

    def make(batch, kind):
        made.append(FakeProbe(kind, layers, model))
        return made[-1]
    return make


FAST_FC0 = {("fc0", "lowrank"): ratio(0.6, 0.03), ("fc0", "kronecker"): ratio(0.8, 0.03),
            ("fc1", "lowrank"): ratio(1.02, 0.06), ("fc1", "kronecker"): ratio(0.7, 0.02),
            # fc2's weight is under min_weight: planned only because force overrides it, and slower
            ("fc2", "lowrank"): ratio(1.3, 0.02), ("fc2", "kronecker"): ratio(1.3, 0.02)}


def test_layer_measured_faster_is_rewritten_the_other_left_dense_with_its_ratio():
    """fc0: confidently faster in low rank -> rewritten, exact at error 0 (ORT agrees); fc1: low
    rank 1.02 [0.96-1.08] -> dense with that reason, though Kronecker would have been faster."""
    made = []
    model = mlp()
    out, report = optimize(model, fc="lowrank", target="latency", error_budget=0.0, force=True, cache="",
                           batches=[1, 8], input_shapes=SHAPES, probe_factory=factory(FAST_FC0, made=made))
    assert fc_layers(out) == {"fc0": "lowrank"}
    assert [layer.name for layer in report.fc.layers] == ["fc0"]
    skipped = dict(report.fc.skipped)
    assert skipped["fc1"] == "not measurably faster on cpu (layer ratio 1.02 [0.96-1.08])"
    assert skipped["fc2"].startswith("not measurably faster")  # force overrides min_weight
    lat = report.fc.latency
    assert lat["layers"]["fc0"]["winner"] == "lowrank" and lat["layers"]["fc0"]["kept"]
    assert lat["layers"]["fc1"]["winner"] == "kronecker" and not lat["layers"]["fc1"]["kept"]
    assert [o["scheme"] for o in lat["layers"]["fc0"]["options"]] == ["lowrank", "kronecker"]
    assert sorted(lat["layers"]["fc0"]["options"][0]["measured"]) == [1, 8]  # every batch timed
    assert lat["faster"] and lat["checks"][0]["rewritten"] == ["fc0"]
    layer_calls = [c for p in made if p.kind == "layer" for c in p.calls]
    assert len(layer_calls) == 3 * 2 * 2 and all(t == fc_latency.FASTER for _, t in layer_calls)  # fc2 too (force)
    assert report.verification.ran and report.verification.outputs[0].relative < 1e-5
    x = np.random.default_rng(2).standard_normal((7, 64)).astype(np.float32)
    np.testing.assert_allclose(logits(out, x), logits(model, x), rtol=1e-4, atol=1e-5)
    assert out.ir_version == model.ir_version and out.opset_import == model.opset_import
    assert json.dumps(report.to_dict()["fc"]["latency"])  # the report's JSON carries the measurements


def test_interval_straddling_the_threshold_is_not_faster():
    """A median below FASTER whose interval reaches above it does not count as faster."""
    layers = {**FAST_FC0, ("fc0", "lowrank"): ratio(0.90, 0.08)}
    out, report = optimize(mlp(), fc="lowrank", target="latency", error_budget=0.0, force=True, cache="",
                           input_shapes=SHAPES, probe_factory=factory(layers), verify=False)
    assert fc_layers(out) == {}
    assert dict(report.fc.skipped)["fc0"] == "not measurably faster on cpu (layer ratio 0.90 [0.82-0.98])"
    assert report.fc.latency["checks"] == [] and "stays dense" in report.fc.latency["message"]


def test_whole_model_not_faster_reverts_the_fc_layers():
    """Both layers are faster alone (Kronecker), but any model holding fc1 measures slower: fc1
    (the worse layer ratio) is reverted first, then fc0 alone is faster and kept."""
    layers = {**FAST_FC0, ("fc0", "kronecker"): ratio(0.6, 0.02), ("fc1", "kronecker"): ratio(0.8, 0.02)}
    slower_with_fc1 = factory(layers, lambda rewritten: ratio(1.1, 0.02) if "fc1" in rewritten else ratio(0.9, 0.02))
    out, report = optimize(mlp(), fc="kronecker", target="latency", error_budget=0.0, force=True, cache="",
                           input_shapes=SHAPES, verify=False, probe_factory=slower_with_fc1)
    assert fc_layers(out) == {"fc0": "kron"}
    assert dict(report.fc.skipped)["fc1"] == "reverted: the whole model was not faster with it"
    steps = report.fc.latency["checks"]
    assert [s["rewritten"] for s in steps] == [["fc1", "fc0"], ["fc0"]] and steps[0]["reverted"] == "fc1"
    fc1 = report.fc.latency["layers"]["fc1"]
    assert fc1["winner"] == "kronecker" and not fc1["kept"]


def test_whole_model_never_faster_keeps_every_fc_layer_dense():
    out, report = optimize(mlp(), fc="lowrank", target="latency", error_budget=0.0, force=True, cache="",
                           input_shapes=SHAPES, verify=False,
                           probe_factory=factory(FAST_FC0, lambda rw: ratio(0.99, 0.03)))
    assert fc_layers(out) == {} and not report.fc.layers
    assert dict(report.fc.skipped)["fc0"] == "reverted: the whole model was not faster with it"
    assert "whole model" in report.fc.latency["message"]


def test_layer_cache_is_reused_and_keyed_by_form(tmp_path):
    cache = str(tmp_path / "lat.json")
    kw = dict(fc="lowrank", target="latency", error_budget=0.0, force=True, cache=cache, input_shapes=SHAPES,
              verify=False)
    first = optimize(mlp(), probe_factory=factory(FAST_FC0), **kw)[1].fc.latency
    made = []
    second = optimize(mlp(), probe_factory=factory(FAST_FC0, made=made), **kw)[1].fc.latency
    assert first["cache"]["misses"] == 6 and second["cache"]["hits"] == 6 and second["cache"]["misses"] == 0
    assert not [c for p in made if p.kind == "layer" for c in p.calls]
    third = optimize(mlp(), probe_factory=factory(FAST_FC0), **{**kw, "error_budget": 0.2})[1].fc.latency
    assert third["cache"]["misses"] > 0  # other ranks: other forms, measured anew


def test_fc_layer_model_is_the_layer_alone_and_its_factored_form_agrees():
    model = mlp()
    sites = find_fc_sites(model, input_shapes=SHAPES)
    plans, _ = plan_fc(sites, "kronecker", error_budget=0.0, only_if_cheaper=False)
    for plan in plans:
        dense = fc_layer_model(plan.site, [3, plan.site.in_features])
        factored = fc_layer_model(plan.site, [3, plan.site.in_features], plan.factors)
        assert [n.op_type for n in dense.graph.node] == [plan.site.op]
        assert fc_layers(factored) == {plan.site.name: "kron"}
        assert all(role_of(n.name, "kron") for n in factored.graph.node)
        x = np.random.default_rng(0).standard_normal((3, plan.site.in_features)).astype(np.float32)
        np.testing.assert_allclose(logits(factored, x), logits(dense, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        fc_layer_model(sites[0], [3, 65])


def test_cli_fc_with_target_latency_runs(runner, tmp_path, monkeypatch):
    """No longer refused (exit 0, the FC lines printed); layer timing injected."""
    made = []
    monkeypatch.setattr(fc_latency, "layer_probes", lambda timing, run, kind: {
        b: factory(FAST_FC0, made=made)(b, kind) for b in timing.batches})
    src, dst = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), src)
    r = runner.invoke(main, ["optimize", str(src), "-o", str(dst), "--fc", "lowrank", "--target", "latency",
                             "--error-budget", "0.0", "--force", "--input-shape", "x:4,64", "--cache", ""])
    assert r.exit_code == 0, r.output
    assert "fc latency on cpu" in r.output and "fastest: lowrank" in r.output
    assert "fc fc1: skipped: not measurably faster on cpu" in r.output
    assert fc_layers(onnx.load(str(dst))) == {"fc0": "lowrank"}
    assert made  # the injected probes did the timing


def test_fc_still_refuses_mismatch_budget_and_uniform_rank_and_a_latency_table(runner, tmp_path):
    with pytest.raises(OptionError, match="mismatch_budget"):
        optimize(mlp(), fc="lowrank", mismatch_budget=0.1, alphas={"fc0": [1.0]}, target="macs")
    with pytest.raises(OptionError, match="mismatch_budget"):
        optimize(mlp(), fc="lowrank", target="latency", mismatch_budget=0.1, alphas={"fc0": [1.0]})
    with pytest.raises(OptionError, match="latency_table"):
        optimize(mlp(), fc="lowrank", target="latency", latency_table=str(tmp_path / "t.json"))
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    r = runner.invoke(main, ["optimize", str(src), "-o", str(tmp_path / "x.onnx"), "--fc", "kronecker",
                             "--target", "latency", "--uniform-rank", "1"])
    assert r.exit_code == 2 and "--uniform-rank" in r.output and not (tmp_path / "x.onnx").exists()
