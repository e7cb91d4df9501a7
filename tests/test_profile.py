"""`profile` on the device -> layer latency table -> `optimize --latency-table` on the host.
Library tests time nothing (injected probes, as in test_latency); the CLI round trip runs a tiny
model with a few rounds and asserts no timing."""

import json

import onnx
import pytest
from test_latency import FakeProbe, _factory, _gdws_layers, _model

from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.errors import OptionError
from gdws_onnx.graph.model_io import load_model
from gdws_onnx.pipeline import latency_table
from gdws_onnx.pipeline.latency_table import LatencyTable
from gdws_onnx.pipeline.options import RunOptions, SelectionOptions, TimingOptions
from gdws_onnx.pipeline.profile import ProfileOptions, profile


def _no_probe(batch, kind):
    raise AssertionError(f"optimize timed a {kind} at batch {batch} though it had a latency table")


def _profiled(tmp_path, batches=(1, 2), layer_args=None, conv="gdws"):
    """A table of the GDWS planner's forms (conv="gdws"), as version 1 held, unless told otherwise."""
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    probes = {"layer_args": layer_args or {}}
    opts = ProfileOptions(timing=TimingOptions(batches=list(batches), probe_factory=_factory(probes)),
                          selection=SelectionOptions(conv=conv))
    table = profile(load_model(str(path)), opts)
    out = tmp_path / "layers.json"
    table.save(str(out))
    return path, out, probes


def test_table_records_environment_model_and_every_realization(tmp_path):
    path, out, probes = _profiled(tmp_path)
    d = json.loads(out.read_text())
    assert d["format"] == latency_table.FORMAT and d["version"] == latency_table.VERSION
    assert d["environment"]["ep"] == "cpu" and d["environment"]["ep_package"] and d["environment"]["onnxruntime"]
    assert d["key_environment"]["ep"] == "cpu" and d["batches"] == [1, 2] and set(d["model_ms"]) == {"1", "2"}
    assert len(d["model"]["sha256"]) == 64
    assert set(d["layers"]) == {"conv1", "conv2", "conv3"}  # conv0: the first conv is skipped
    for ms in d["layers"].values():
        assert {m["batch"] for m in ms} == {1, 2}
        assert all({"median", "ci_low", "ci_high", "rounds", "baseline_ms"} <= set(m["ratio"]) for m in ms)
    table = LatencyTable.load(str(out))
    assert table.to_dict() == d  # reads back what it wrote
    layer_calls = sum(p.calls for p in probes["layer"])
    keys = [m["key"] for ms in d["layers"].values() for m in ms]
    assert layer_calls == len(set(keys)) < len(keys)  # each timed once: conv2 and conv3 have one geometry


def test_optimize_with_the_table_times_nothing_and_picks_within_the_budget(tmp_path):
    """Each layer picks the fastest realization the table shows measurably faster (upper bound
    below FASTER at every batch) whose error is within the budget, whatever budget was profiled."""
    from gdws_onnx.pipeline.measure import FASTER

    slow = {"conv1": 1.3}  # conv1's GDWS forms are slower on the "device"; the others as their costs say
    path, out, _ = _profiled(tmp_path, layer_args={"layer_ratio": slow})
    for eps in (0.3, 0.5):  # profiled at the default 0.1: other budgets pick among the same measurements
        from_table, rep = optimize(str(path), conv="gdws", target="latency", error_budget=eps, batches=[1, 2],
                                   latency_table=str(out), probe_factory=_no_probe)
        lat = rep.latency
        assert _gdws_layers(from_table) == {n for n, e in lat["layers"].items() if e["chosen"] is not None}
        assert _gdws_layers(from_table) == {"conv2", "conv3"}
        for name in ("conv2", "conv3"):
            chosen = lat["layers"][name]["options"][lat["layers"][name]["chosen"]]
            assert all(r["ci_high"] < FASTER for r in chosen["ratios"].values())
            layer = next(r for r in rep.layers if r.name == name)
            assert layer.relative_error <= eps + 1e-9
        assert lat["cache"]["table"] and lat["checks"] == [] and "whole-model check was skipped" in lat["message"]
        assert "on the cpu EP at batch 1,2" in lat["message"]
        assert rep.verification.passed  # correctness is still checked on the host


def test_a_table_from_another_machine_and_another_file_name_is_used(tmp_path):
    """Keys are the layer geometry under the table's own recorded environment, not the host's."""
    path, out, _ = _profiled(tmp_path, batches=(1,))
    d = json.loads(out.read_text())
    d["key_environment"].update(cpu="Some ARM board", cpus=4, ort="1.24.1", ep="openvino")
    keyed = LatencyTable.from_dict(d)
    d["environment"].update(cpu="Some ARM board", onnxruntime_package="onnxruntime-openvino")
    d["model"].update(name="/device/elsewhere.onnx", sha256="0" * 64)
    # re-key every measurement as the other machine would have (its environment in the hash)
    from gdws_onnx.graph.convs import find_convs
    from gdws_onnx.pipeline.measure import LatencyCache
    sites = {s.name: s for s in find_convs(_model(), "")}
    for name, ms in d["layers"].items():
        for m in ms:
            m["key"] = LatencyCache.key(sites[name], (m["total_rank"], m["multiplier"]), m["batch"],
                                        keyed.key_environment)
    other = tmp_path / "from_device.json"
    other.write_text(json.dumps(d))
    renamed = tmp_path / "renamed.onnx"
    renamed.write_bytes(path.read_bytes())
    m1, rep = optimize(str(renamed), conv="gdws", target="latency", error_budget=0.3, ep="openvino", latency_table=str(other),
                       probe_factory=_no_probe, verify=False)
    m2, _ = optimize(str(path), conv="gdws", target="latency", error_budget=0.3, latency_table=str(out),
                     probe_factory=_no_probe, verify=False)
    assert _gdws_layers(m1) == _gdws_layers(m2) and _gdws_layers(m1)
    assert "measured on openvino, Some ARM board" in rep.latency["message"]
    # keys hashed with the host's environment instead do not match that table
    d["key_environment"]["cpu"] = "another CPU"
    other.write_text(json.dumps(d))
    with pytest.raises(OptionError, match="has no measurement of"):
        optimize(str(renamed), conv="gdws", target="latency", error_budget=0.3, latency_table=str(other),
                 probe_factory=_no_probe, verify=False)


def test_latency_budget_from_the_table_is_predicted_not_measured(tmp_path):
    path, out, _ = _profiled(tmp_path, batches=(1,))
    _, rep = optimize(str(path), conv="gdws", target="latency", latency_reduction=1.05, latency_table=str(out),
                      probe_factory=_no_probe, verify=False)
    assert rep.budget.mode == "latency" and rep.budget.achieved is None
    assert rep.latency["model_baseline_ms"] == json.loads(out.read_text())["model_ms"]["1"]


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="something else"), "is not an onnx-gdws latency table"),
    (lambda d: d.update(version=99), "format version 99; this onnx-gdws reads versions 1, 2"),
    (lambda d: d.pop("layers"), "is malformed"),
    (lambda d: next(iter(d["layers"].values()))[0]["ratio"].pop("median"), "is malformed"),
])
def test_table_format_errors_name_the_option(tmp_path, edit, match):
    _, out, _ = _profiled(tmp_path, batches=(1,))
    d = json.loads(out.read_text())
    edit(d)
    with pytest.raises(OptionError, match=match) as e:
        LatencyTable.from_dict(d, "t.json")
    assert e.value.params[0] == "latency_table"


def test_table_misuse_is_one_error_exit_2_and_no_output(runner, tmp_path):
    path, out, _ = _profiled(tmp_path, batches=(1,))
    res = tmp_path / "o.onnx"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.onnx"
    from builders import small_cnn
    onnx.save(small_cnn(channels=(8, 24, 24), size=10), other)
    cases = [
        (["optimize", str(path), "-o", str(res), "--latency-table", str(out), "--target", "macs"], "--latency-table needs --target"),
        (["optimize", str(path), "-o", str(res), "--target", "latency", "--latency-table", str(out), "--batch", "32"],
         "not at [32]: give --batch"),
        (["optimize", str(path), "-o", str(res), "--target", "latency", "--latency-table", str(bad)], "is not JSON"),
        (["optimize", str(path), "-o", str(res), "--target", "latency", "--latency-table", str(tmp_path / "no.json")],
         "cannot read --latency-table"),
        (["optimize", str(other), "-o", str(res), "--conv", "gdws", "--target", "latency", "--latency-table",
          str(out)], "has no measurement of"),
        (["optimize", str(path), "-o", str(res), "--latency-table", str(out)],  # conv auto by default
         "holds the GDWS planner's forms only (profiled for --conv gdws): profile the model again for --conv auto"),
    ]
    for argv, match in cases:
        r = runner.invoke(main, argv)
        assert r.exit_code == 2 and match in r.output and not res.exists(), (argv, r.output)


def test_profile_then_optimize_from_the_cli(runner, cnn_path, tmp_path):
    """Real ONNX Runtime on a tiny model, few rounds: the file round trip, not the numbers."""
    table, out = tmp_path / "layers.json", tmp_path / "o.onnx"
    r = runner.invoke(main, ["profile", cnn_path, "-o", str(table), "--runs", "3", "--max-rounds", "3",
                             "--threads", "1", "--batch", "1,2"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and LatencyTable.load(str(table)).batches == [1, 2]
    r = runner.invoke(main, ["optimize", cnn_path, "-o", str(out), "--target", "latency",
                             "--latency-table", str(table), "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert out.exists() and "whole-model check was skipped" in " ".join(r.output.split())
    assert "on the device: onnx-gdws bench ORIGINAL OPTIMIZED --ep cpu --batch 2" in r.output
    r = runner.invoke(main, ["profile", cnn_path, "-o", str(table), "--runs", "2"])
    assert r.exit_code == 2 and "--runs" in r.output


def _auto_profiled(tmp_path, price, conv="auto", eps=0.2):
    """The table `profile --conv CONV --error-budget EPS` writes for a small CNN whose layer
    latencies FamilyProbe prices per family."""
    from builders import small_cnn
    from test_auto import FamilyProbe

    from gdws_onnx.pipeline.options import BudgetOptions

    path, out = tmp_path / "c.onnx", tmp_path / f"{conv}.json"
    onnx.save(small_cnn(channels=(16, 32, 32, 32), size=8), path)
    opts = ProfileOptions(timing=TimingOptions(batches=[1], probe_factory=lambda b, kind: FamilyProbe(kind, price)),
                          selection=SelectionOptions(conv=conv), budget=BudgetOptions(target="latency", error_budget=eps))
    profile(load_model(str(path)), opts).save(str(out))
    return path, out


def test_an_auto_table_plans_every_family_as_timing_on_the_device_would(tmp_path):
    """`profile --conv auto` holds every family's forms on the budget's ladder; optimize reads
    them, times nothing, and makes the picks that timing the same layers would."""
    from test_auto import FamilyProbe, _families_used

    price = {"gdws": 3.0, "ssvd": 0.3, "tucker": 0.5}
    path, out = _auto_profiled(tmp_path, price)
    table = LatencyTable.load(str(out))
    assert table.conv == "auto" and table.families == ["gdws", "ssvd", "tucker"] and table.error_budget == 0.2
    rows = [m for ms in table.layers.values() for m in ms]
    assert {m.family for m in rows} >= {"ssvd", "tucker"} and all(m.error is not None and m.form for m in rows)
    assert all(m.ranks and len(m.ranks) == 2 for m in rows if m.family == "tucker")
    timed, _ = optimize(str(path), target="latency", error_budget=0.2, cache="", verify=False,
                        probe_factory=lambda b, kind: FamilyProbe(kind, price))
    from_table, rep = optimize(str(path), target="latency", error_budget=0.2, latency_table=str(out),
                               probe_factory=_no_probe)
    assert _families_used(from_table) == _families_used(timed) == {"ssvd"}
    assert [n.name for n in from_table.graph.node] == [n.name for n in timed.graph.node]
    lat = rep.latency
    assert lat["cache"]["table"] and lat["checks"] == [] and "whole-model check was skipped" in lat["message"]
    assert all(layer.family == "ssvd" and layer.measured_ratio for layer in rep.rewritten)
    assert rep.verification.passed  # correctness is still checked on the host
    # spatial SVD alone (auto restricted) reads the same table
    alone, _ = optimize(str(path), conv="ssvd", target="latency", error_budget=0.2, latency_table=str(out),
                        probe_factory=_no_probe, verify=False)
    assert _families_used(alone) == {"ssvd"}


@pytest.mark.parametrize("table_conv, options, match, params", [
    ("gdws", {}, "holds the GDWS planner's forms only", ("latency_table", "conv=auto", "conv=gdws")),
    ("auto", {"conv": "gdws"}, "holds the forms of every family", ("latency_table", "conv=gdws", "conv=auto")),
    ("ssvd", {}, "holds no gdws, tucker forms (it has ssvd)", ("latency_table",)),
    ("auto", {"error_budget": 0.3}, "holds the forms of error budget 0.2, not 0.3", ("latency_table", "error_budget")),
])
def test_a_table_without_the_plans_forms_is_one_clear_error(tmp_path, table_conv, options, match, params):
    if table_conv == "gdws":
        path, out, _ = _profiled(tmp_path, batches=(1,))
    else:
        path, out = _auto_profiled(tmp_path, {"ssvd": 0.3}, conv=table_conv)
    kw = {"error_budget": 0.2, **options}
    with pytest.raises(OptionError, match=match.replace("(", r"\(").replace(")", r"\)")) as e:
        optimize(str(path), target="latency", latency_table=str(out), probe_factory=_no_probe, verify=False, **kw)
    assert e.value.params == params


def test_a_version_1_table_is_read_as_the_gdws_planners(tmp_path):
    path, out, _ = _profiled(tmp_path, batches=(1,))
    d = json.loads(out.read_text())
    for key in ("conv", "families", "error_budget"):
        d.pop(key)
    d["version"] = 1
    out.write_text(json.dumps(d))
    table = LatencyTable.load(str(out))
    assert table.conv == "gdws" and table.version == 1
    m, _ = optimize(str(path), conv="gdws", target="latency", error_budget=0.3, latency_table=str(out),
                    probe_factory=_no_probe, verify=False)
    assert _gdws_layers(m)
    with pytest.raises(OptionError, match=r"GDWS planner's forms only \(format version 1\)"):
        optimize(str(path), target="latency", latency_table=str(out), probe_factory=_no_probe, verify=False)


def test_profile_refuses_alphas_outside_the_gdws_planner(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    opts = ProfileOptions(selection=SelectionOptions(conv="auto"))
    opts.budget.alphas = {"conv1": [1.0]}
    with pytest.raises(OptionError) as e:
        profile(load_model(str(path)), opts)
    assert e.value.params == ("alphas", "conv=gdws")
