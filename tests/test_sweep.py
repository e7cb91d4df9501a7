"""The trade-off sweep (issue 7): points, peers, resumability, and a report that says what the JSON says."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from gdws_onnx import GDWSError, optimize
from gdws_onnx.cli import main
from gdws_onnx.sweep.plan import DEFAULT_PEERS, SweepOptions, parse_budget, parse_fc_budget, parse_peer, plan_points
from gdws_onnx.sweep.results import PointResult, SweepResult, load_sweep
from gdws_onnx.sweep.run import Sweep, sweep
from gdws_onnx.pipeline.int8 import QUANTIZE_ACTIVATIONS
from gdws_onnx.sweep.report import best_within, pareto, write_report
from validate_helpers import fashion, fm_cnn

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

N = 24


@pytest.fixture(scope="module")
def files(tmp_path_factory, fashion_mnist):
    d = tmp_path_factory.mktemp("sweep_in")
    x, y = fashion(N)
    data = str(d / "data.npz")
    np.savez(data, x=x, y=y)
    model = str(d / "cnn.onnx")
    onnx.save(fm_cnn(), model)
    return model, data


def small_options(data: str, **kw) -> SweepOptions:
    base = dict(data=data, n=N, steps=2, budgets=("error:0.05", "mac:1.3"),
                peers=("dws", "ssvd", "prune", "int8", "gdws+int8"), batches=(1,), runs=3, skip_first=False)
    base.update(kw)
    opts = SweepOptions(**base)
    opts.attacks = ("pgd",)
    return opts


@pytest.fixture(scope="module")
def done(files, tmp_path_factory):
    model, data = files
    out = str(tmp_path_factory.mktemp("sweep_out"))
    result = sweep(model, out, small_options(data), command="test")
    return out, result


def test_budget_and_peer_specs():
    assert parse_budget("error:0.05") == {"error_budget": 0.05, "target": "macs"}  # planned by MACs, timed by the sweep
    assert parse_budget("latency:1.2") == {"latency_reduction": 1.2, "target": "latency"}
    assert parse_peer("uniform:3") == ("uniform", 3)
    assert parse_peer("ssvd") == ("ssvd", None) and parse_peer("prune:2.5") == ("prune", 2.5)
    for bad in ("err:1", "mac:x", "mac"):
        with pytest.raises(GDWSError):
            parse_budget(bad)
    for bad in ("uniform", "dws:2", "int8:2", "prune:1", "ssvd:x", "quantize", "uniform:0"):
        with pytest.raises(GDWSError):
            parse_peer(bad)


def test_mac_peers_at_their_own_reduction_and_at_the_gdws_points():
    """ssvd:R / prune:R are planned at MACs / R; bare ssvd / prune follow the measured GDWS points."""
    from gdws_onnx.sweep.plan import matched_points

    opts = SweepOptions(budgets=("error:0.1",), peers=("ssvd:3", "prune:2"))
    planned = {p.label: p.params for p in plan_points(opts)}
    assert planned["ssvd mac:3"] == {"mac_reduction": 3.0}
    assert planned["prune mac:2"] == {"mac_reduction": 2.0, "multiple": 8}
    gdws = [PointResult(key="g", label="gdws error:0.1", method="gdws", params={}, status="ok",
                        conv_mac_reduction=1.5)]
    assert matched_points(opts, gdws) == []  # no bare ssvd / prune: nothing placed at the GDWS point
    both = SweepOptions(budgets=("error:0.1",), peers=("ssvd", "ssvd:3"))
    assert [p.label for p in matched_points(both, gdws)] == ["ssvd mac:1.5"]


def _conv_macs(model: onnx.ModelProto) -> int:
    """Conv MACs per sample, counted here: weight elements x output pixels (shapes inferred)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim[2:]] for v in inferred.graph.value_info}
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes[n.input[1]] * int(np.prod(dims[n.output[0]])) for n in model.graph.node if n.op_type == "Conv")


def _predictions(path: str, x: np.ndarray) -> np.ndarray:
    from gdws_onnx.runtime.session import make_session

    session = make_session(path)
    return session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)


@pytest.mark.slow
def test_every_point_measured(done, files):
    """Each point's saved model reproduces its recorded accuracy, agreement and MACs; the GDWS
    points meet the budgets asked for."""
    out, result = done
    model_path, data = files
    x, y = np.load(data)["x"], np.load(data)["y"]
    original = _predictions(model_path, x)
    by_method = {}
    for p in result.points:
        assert p.status == "ok", (p.label, p.error)
        by_method.setdefault(p.method, []).append(p)
        pred = _predictions(os.path.join(out, p.model_file), x)
        assert p.clean == pytest.approx(np.mean(pred == y)), p.label
        assert p.agreement == pytest.approx(np.mean(pred == original)), p.label
        if p.method not in ("int8", "gdws+int8"):  # quantized points carry their float parent's MACs
            assert p.conv_macs == _conv_macs(onnx.load(os.path.join(out, p.model_file))), p.label
    assert set(by_method) == {"original", "gdws", "dws", "ssvd", "prune", "int8", "gdws+int8"}
    orig = next(p for p in by_method["original"] if p.key == "original")
    assert orig.clean == pytest.approx(np.mean(original == y)) and orig.conv_macs == _conv_macs(onnx.load(model_path))
    assert orig.conv_mac_reduction == pytest.approx(1.0) and orig.agreement == 1.0
    # the GDWS points are the budgets asked for ("error:0.05", "mac:1.3"), each met
    gdws = {json.dumps(p.params, sort_keys=True): p for p in by_method["gdws"]}
    assert set(gdws) == {'{"error_budget": 0.05, "target": "macs"}', '{"mac_reduction": 1.3, "target": "macs"}'}
    assert gdws['{"mac_reduction": 1.3, "target": "macs"}'].conv_mac_reduction >= 1.3
    expected, _ = optimize(onnx.load(model_path), error_budget=0.05, skip_first=False, verify=False, target="macs")
    assert gdws['{"error_budget": 0.05, "target": "macs"}'].conv_macs == _conv_macs(expected)  # 0.05 pays off nowhere here; 0.1 would
    # spatial SVD and pruning are placed at the MACs of each GDWS point that reduced them
    gd = {round(p.conv_mac_reduction, 4) for p in by_method["gdws"] if p.conv_mac_reduction > 1}
    assert {p.params["mac_reduction"] for p in by_method["ssvd"]} == gd
    assert {p.params["mac_reduction"] for p in by_method["prune"]} == gd
    for p in by_method["ssvd"]:
        assert p.conv_mac_reduction >= p.params["mac_reduction"] * 0.97
    # INT8 points keep their float parent's MACs and are smaller on disk
    assert by_method["int8"][0].conv_macs == orig.conv_macs
    assert by_method["int8"][0].file_bytes < orig.file_bytes
    assert len(by_method["gdws+int8"]) == len(by_method["gdws"])
    # quantized points: BPDA gradients plus Square, compared with the original under the same attacks,
    # and quantized as optimize(quantize="int8") quantizes (its activation type)
    for p in by_method["int8"] + by_method["gdws+int8"]:
        assert p.gradient_source == "torch-bpda" and set(p.robust_by_attack) == {"pgd", "square"}
        assert p.reference == "original+square"
        assert p.params["activations"] == QUANTIZE_ACTIVATIONS
        q = onnx.load(os.path.join(out, p.model_file)).graph
        types = {t.name: t.data_type for t in q.initializer}
        activations = {types[n.input[2]] for n in q.node if n.op_type == "QuantizeLinear"}
        assert activations == {onnx.helper.np_dtype_to_tensor_dtype(np.dtype(QUANTIZE_ACTIVATIONS))}, p.label
    ref = next(p for p in by_method["original"] if p.key == "original+square")
    assert set(ref.robust_by_attack) == {"pgd", "square"} and ref.robust <= orig.robust
    assert all(p.reference == "original" for p in by_method["gdws"] + by_method["ssvd"])
    assert os.path.isfile(os.path.join(out, "sweep.json"))


@pytest.mark.slow
def test_wall_time_of_every_point_and_phase(done):
    """Each point records its wall time and that of each phase: rewrite, evaluation, each attack run
    (Square included where it was added), timing; the phases fit in the point's total."""
    _, result = done
    for p in result.points:
        assert p.seconds > 0 and {"clean", "attack pgd", "timing"} <= set(p.phases), (p.label, p.phases)
        assert all(v >= 0 for v in p.phases.values())
        assert sum(p.phases.values()) <= p.seconds + 1e-6
        assert ("build" in p.phases) == (p.method != "original")
        assert ("attack square" in p.phases) == (p.method in ("int8", "gdws+int8") or p.key == "original+square")
    assert result.seconds >= sum(p.seconds for p in result.points) - 1e-6
    assert len(result.extra_attacks) == 1 and "Square" in result.extra_attacks[0]
    assert "int8" in result.extra_attacks[0] and "original+square" in result.extra_attacks[0]


def test_extra_attacks_are_said_before_any_work(files, tmp_path, monkeypatch):
    model, data = files
    lines = []

    def first_point(self, spec, done):
        lines.append(f"measuring {spec.label}")
        return PointResult(key=spec.key, label=spec.label, method=spec.method, params=spec.params, status="failed",
                           error="not measured in this test")

    monkeypatch.setattr(Sweep, "run_point", first_point)
    sweep(model, str(tmp_path), small_options(data, peers=("int8",)), log=lines.append)
    first = next(i for i, line in enumerate(lines) if line.startswith("measuring"))
    said = [line for line in lines[:first] if "Square" in line]
    assert len(said) == 1 and "BPDA" in said[0] and "original+square" in said[0]
    assert "original+square" in lines[0]  # the plan lists the points
    lines.clear()
    sweep(model, str(tmp_path / "b"), small_options(data, peers=("ssvd",)), log=lines.append)
    assert not any("Square" in line for line in lines)  # nothing extra without quantized points


@pytest.mark.slow
def test_rerun_skips_finished_points(done, files, monkeypatch):
    out, first = done
    model, data = files

    def no_build(*a, **k):
        raise AssertionError("a finished point was rebuilt")

    monkeypatch.setattr(Sweep, "build", no_build)
    again = sweep(model, out, small_options(data), command="test")
    assert [p.__dict__ for p in again.points] == [p.__dict__ for p in first.points]


def test_a_resumed_sweep_compares_new_points_with_the_stored_original(files, tmp_path, monkeypatch):
    """The original's per-sample evaluation is kept in baselines/: a rerun that adds a point
    attacks only the new point, and compares it with the same original as the first run did."""
    import gdws_onnx.sweep.run as run

    model, data = files
    out = str(tmp_path)
    sweep(model, out, small_options(data, budgets=("error:0.05",), peers=()))
    evaluated = []
    real = run.evaluate_model

    def counting(model, path, *a, **k):
        evaluated.append(os.path.basename(path))
        return real(model, path, *a, **k)

    monkeypatch.setattr(run, "evaluate_model", counting)
    again = sweep(model, out, small_options(data, budgets=("error:0.05", "error:0.2"), peers=()))
    assert evaluated == ["gdws_error_0.2.onnx"]
    new = next(p for p in again.points if p.label == "gdws error:0.2")
    assert new.status == "ok" and "reference" not in new.phases and new.agreement is not None
    evaluated.clear()
    sweep(model, out, small_options(data, budgets=("error:0.05", "error:0.1"), peers=(), steps=3))
    assert os.path.basename(model) in evaluated  # other attack settings: the original is attacked again


def test_a_failed_point_is_kept_on_rerun_until_retry_failed(files, tmp_path, monkeypatch):
    """A point that failed is recorded; a rerun under the same settings keeps the failure instead of
    rebuilding it (it would fail again), and says how to rebuild it; retry_failed rebuilds it."""
    from gdws_onnx.errors import GateFailed

    model, data = files
    out = str(tmp_path / "s")
    real = Sweep.build

    def failing(self, spec, done):
        if spec.method == "gdws":
            raise GateFailed("gradient check: torch and ORT disagree {here}")
        return real(self, spec, done)

    monkeypatch.setattr(Sweep, "build", failing)
    opts = dict(budgets=("error:0.05",), peers=())
    first = {p.label: p for p in sweep(model, out, small_options(data, **opts)).points}
    assert first["gdws error:0.05"].status == "failed" and "disagree" in first["gdws error:0.05"].error

    def no_build(self, spec, done):
        raise AssertionError(f"{spec.label} was rebuilt")

    monkeypatch.setattr(Sweep, "build", no_build)
    lines = []
    again = {p.label: p for p in sweep(model, out, small_options(data, **opts), log=lines.append).points}
    assert again["gdws error:0.05"].status == "failed"
    said = [line for line in lines if "failed before" in line]
    assert len(said) == 1 and "retry_failed=True" in said[0] and "{here}" in said[0]
    r = CliRunner().invoke(main, ["sweep", model, "--data", data, "--n", str(N), "--steps", "2", "--budget",
                                  "error:0.05", "--peer", "none", "--batch", "1", "--runs", "3",
                                  "--no-skip-first", "--attack", "pgd", "--out", out])
    assert r.exit_code == 0, r.output
    assert "failed before, skipped (--retry-failed to rebuild it)" in r.output

    monkeypatch.setattr(Sweep, "build", real)
    retried = {p.label: p for p in sweep(model, out, small_options(data, retry_failed=True, **opts)).points}
    assert retried["gdws error:0.05"].status == "ok"
    assert retried["original"].fingerprint == first["original"].fingerprint  # not a setting of the points


def test_changed_settings_redo_points(files, tmp_path):
    model, data = files
    out = str(tmp_path)
    sweep(model, out, small_options(data, budgets=("error:0.05",), peers=()))
    before = json.load(open(os.path.join(out, "points", "gdws_error_0.05.json")))
    built = []
    orig_build = Sweep.build

    def counting(self, spec, d):
        built.append(spec.key)
        return orig_build(self, spec, d)

    Sweep.build, saved = counting, Sweep.build
    try:
        sweep(model, out, small_options(data, budgets=("error:0.05",), peers=(), steps=3))
    finally:
        Sweep.build = saved
    after = json.load(open(os.path.join(out, "points", "gdws_error_0.05.json")))
    assert "gdws_error_0.05" in built and before["fingerprint"] != after["fingerprint"]


def _md_rows(text: str, section: str = "## Points") -> dict[str, list[str]]:
    rows = {}
    body = text.split(section + "\n", 1)[1].split("\n## ", 1)[0]
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("| point"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_report_table_matches_json(done):
    out, _ = done
    files = write_report(load_sweep(out), out)
    data = json.load(open(os.path.join(out, "sweep.json")))
    rows = _md_rows(open(files.markdown).read())
    assert len(rows) == len(data["points"])
    for p in data["points"]:
        cells = rows[p["label"]]
        assert float(cells[2]) == pytest.approx(p["conv_mac_reduction"], abs=0.006)
        assert int(cells[3]) == p["parameters"]
        assert float(cells[5]) == pytest.approx(100 * p["clean"], abs=0.051)
        assert float(cells[6]) == pytest.approx(100 * p["robust"], abs=0.051)
        med, lo, hi = map(float, re.match(r"([\d.]+) \[([\d.]+)-([\d.]+)\]", cells[8]).groups())
        assert [med, lo, hi] == pytest.approx(p["latency"]["b1"][:3], abs=0.006)
    times = _md_rows(open(files.markdown).read(), "## Wall time")
    head = next(line for line in open(files.markdown).read().split("## Wall time")[1].splitlines()
                if line.startswith("| point"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert len(times) == len(data["points"])
    for p in data["points"]:
        cells = dict(zip(cols, times[p["label"]]))
        assert float(cells["total s"]) == pytest.approx(p["seconds"], abs=0.051)
        for phase, seconds in p["phases"].items():
            assert float(cells[phase.replace("_", " ") + " s"]) == pytest.approx(seconds, abs=0.051)
    assert data["extra_attacks"] and data["extra_attacks"][0] in open(files.markdown).read()
    page = open(files.html).read()
    assert page.count("data:image/png;base64,") == len(files.images) == 2
    assert not re.search(r"(src|href)=\"?https?:", page)  # opens offline
    for img in files.images:
        assert open(img, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _pt(label, method, robust, lat):
    return PointResult(key=label, label=label, method=method, params={}, status="ok", robust=robust, clean=robust,
                       latency={"b1": [lat, lat, lat]})


def test_pareto_and_best_within():
    pts = [_pt("original", "original", 0.70, 1.0), _pt("a", "gdws", 0.695, 0.8), _pt("b", "gdws", 0.60, 0.5),
           _pt("c", "gdws", 0.65, 0.9), _pt("q", "int8", 0.69, 0.45)]
    assert [p.label for p in pareto(pts, "b1")] == ["q", "a", "original"]
    s = SweepResult(model="m", model_sha256="0", options={"batches": [1]}, environment={}, points=pts)
    assert best_within(s, ("gdws",), "b1").label == "a"
    assert best_within(s, ("int8",), "b1").label == "q"
    assert best_within(s, ("gdws",), "b1", max_drop_pp=0.1) is None


def test_cli_sweep(files, tmp_path):
    model, data = files
    out = str(tmp_path / "s")
    r = CliRunner().invoke(main, ["sweep", model, "--data", data, "--n", "16", "--steps", "1", "--budget",
                                  "error:0.1", "--peer", "dws", "--batch", "1", "--runs", "3", "--no-skip-first",
                                  "--out", out, "-q"])
    assert r.exit_code == 0, r.output
    assert {"sweep.json", "report.md", "report.html", "robust_vs_latency.png"} <= set(os.listdir(out))
    bad = CliRunner().invoke(main, ["sweep", model, "--data", data, "--budget", "fast:2", "--out", out])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_paper_table_rows():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "paper_table.py")
    spec = importlib.util.spec_from_file_location("paper_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pts = [_pt("original", "original", 0.70, 1.0), _pt("a", "gdws", 0.695, 1.3), _pt("b", "gdws", 0.60, 0.5),
           _pt("q", "int8", 0.69, 0.45), _pt("s", "ssvd", 0.5, 0.8)]
    s = SweepResult(model="m.onnx", model_sha256="0", options={"batches": [1]}, environment={}, points=pts)
    rows = {r[1]: r for r in mod.rows(s, 1.0)}
    assert rows["GDWS"][2] == "a" and rows["GDWS"][6].startswith("1.30")
    assert rows["INT8 (ORT static, QDQ)"][2] == "q"
    assert rows["spatial SVD"][2].startswith("none within 1 pt (best robust 50.0 %")
    pts[1].latency["b1"] = [0.8, 0.7, 0.9, 0.75, 0.85]  # a: faster, with a CI below 1
    pts[3].latency["b1"] = [0.5, 0.4, 1.2, 0.45, 1.01]  # q: its CI reaches above 1
    answer = {r[0]: r for r in mod.answer_rows(s, 1.0)}
    assert answer["GDWS"][2:] == ["a", "-", "69.5 (70.0)", "69.5 (70.0)", "0.80 [0.75-0.85]", "faster"]
    assert answer["INT8 (ORT static, QDQ)"][-1] == "not measurably faster"
    assert answer["spatial SVD"][2] == "none within 1 pt"
    listed = {r[0]: r for r in mod.point_rows(s)}
    assert set(listed) == {p.label for p in pts} and listed["a"][-1] == "0.80 [0.75-0.85]"


def test_new_timing_settings_retime_without_rebuilding(files, tmp_path, monkeypatch):
    model, data = files
    out = str(tmp_path)
    first = sweep(model, out, small_options(data, budgets=("error:0.05",), peers=()))
    import gdws_onnx.sweep.run as sw

    def no_eval(*a, **k):
        raise AssertionError("accuracy was re-measured")

    monkeypatch.setattr(Sweep, "build", no_eval)
    monkeypatch.setattr(sw, "evaluate_model", no_eval)
    again = sweep(model, out, small_options(data, budgets=("error:0.05",), peers=(), runs=4, batches=(1, 2)))
    for a, b in zip(first.points, again.points):
        assert (a.clean, a.robust, a.fingerprint) == (b.clean, b.robust, b.fingerprint)
        assert b.timing["runs"] == 4 and set(b.latency) == {"b1", "b2"}


# -- the FC peers (issue 18) -----------------------------------------------------------------

FC_BUDGETS = ("error:0.1", "mac:2")


def test_fc_peer_specs():
    assert parse_peer("fc-kronecker") == ("fc-kronecker", None) and parse_peer("fc-lowrank") == ("fc-lowrank", None)
    assert parse_fc_budget("mac:2") == {"mac_reduction": 2.0, "target": "macs"}
    for bad in ("latency:1.2", "error:x", "mac"):
        with pytest.raises(GDWSError):
            parse_fc_budget(bad)
    with pytest.raises(GDWSError):
        parse_peer("fc-kronecker:2")
    assert not any(p.startswith("fc-") for p in DEFAULT_PEERS)  # not on by default
    opts = SweepOptions(budgets=(), peers=("fc-kronecker", "fc-lowrank"), fc_budgets=FC_BUDGETS)
    specs = [(s.method, s.params, s.label) for s in plan_points(opts)]
    assert specs == [("original", {}, "original"),
                     ("fc-kronecker", {"error_budget": 0.1, "target": "macs"}, "fc-kronecker error:0.1"),
                     ("fc-kronecker", {"mac_reduction": 2.0, "target": "macs"}, "fc-kronecker mac:2"),
                     ("fc-lowrank", {"error_budget": 0.1, "target": "macs"}, "fc-lowrank error:0.1"),
                     ("fc-lowrank", {"mac_reduction": 2.0, "target": "macs"}, "fc-lowrank mac:2")]


@pytest.fixture(scope="module")
def fc_done(files, tmp_path_factory):
    model, data = files
    out = str(tmp_path_factory.mktemp("sweep_fc"))
    opts = small_options(data, budgets=(), peers=("fc-kronecker", "fc-lowrank"), fc_budgets=FC_BUDGETS)
    return out, sweep(model, out, opts, command="test")


@pytest.mark.slow
def test_fc_points_measured_like_the_others(fc_done, files):
    """FC points: their saved models reproduce clean accuracy and agreement, the convs are untouched
    (conv MACs are the original's), the FC MACs counted on the graph are the original's minus what
    the rewrite's report says it saved, a MAC budget is met, and each point was attacked and timed."""
    out, result = fc_done
    model_path, data = files
    x, y = np.load(data)["x"], np.load(data)["y"]
    original = _predictions(model_path, x)
    orig = result.points[0]
    assert orig.method == "original" and orig.fc_macs == 10 * 144  # fm_cnn: one Gemm, 144 -> 10
    fc_points = [p for p in result.points if p.method in ("fc-kronecker", "fc-lowrank")]
    assert len(fc_points) == 4
    for p in fc_points:
        assert p.status == "ok", (p.label, p.error)
        saved = onnx.load(os.path.join(out, p.model_file))
        pred = _predictions(os.path.join(out, p.model_file), x)
        assert p.clean == pytest.approx(np.mean(pred == y)) and p.agreement == pytest.approx(np.mean(pred == original))
        assert p.conv_macs == orig.conv_macs == _conv_macs(saved) and p.conv_mac_reduction == pytest.approx(1.0)
        rw = p.fc_rewrite
        assert rw is not None and rw["scheme"] == p.method[3:] and rw["rewritten"] == 1, (p.label, rw)
        scope = "/kron/" if p.method == "fc-kronecker" else "/lowrank/"
        assert any(scope in n.name for n in saved.graph.node) and not any(n.op_type == "Gemm" for n in saved.graph.node)
        assert p.fc_macs == orig.fc_macs - rw["macs_per_row_before"] + rw["macs_per_row_after"], p.label
        assert p.fc_mac_reduction == pytest.approx(orig.fc_macs / p.fc_macs)
        assert p.parameters == orig.parameters - rw["params_before"] + rw["params_after"], p.label
        if "mac_reduction" in p.params:
            assert p.fc_mac_reduction >= 2
        assert p.robust is not None and "attack pgd" in p.phases and set(p.latency) == {"b1"}


@pytest.mark.slow
def test_fc_report_columns(fc_done):
    """The table has an FC-MAC column beside (not inside) the conv-MAC one, read from the JSON."""
    out, _ = fc_done
    files = write_report(load_sweep(out), out)
    text = open(files.markdown).read()
    head = next(line for line in text.split("## Points")[1].splitlines() if line.startswith("| point"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[2:4] == ["conv MACs /", "FC MACs /"]
    rows = _md_rows(text)
    for p in json.load(open(os.path.join(out, "sweep.json")))["points"]:
        cells = dict(zip(cols, rows[p["label"]]))
        assert float(cells["conv MACs /"]) == pytest.approx(1.0)
        assert float(cells["FC MACs /"]) == pytest.approx(p["fc_mac_reduction"], abs=0.006)
        assert float(cells["robust %"]) == pytest.approx(100 * p["robust"], abs=0.051)
    assert "FC: Kronecker sums" in text and "FC: low rank" in text and "Gemm/MatMul layers" in text


def test_cli_fc_peers(files, tmp_path):
    """--budget none leaves only the original and the FC points; a budget FC layers cannot take is bad input."""
    model, data = files
    out = str(tmp_path / "s")
    r = CliRunner().invoke(main, ["sweep", model, "--data", data, "--n", "16", "--steps", "1", "--budget", "none",
                                  "--peer", "fc-lowrank", "--fc-budget", "mac:2", "--batch", "1", "--runs", "3",
                                  "--out", out, "-q"])
    assert r.exit_code == 0, r.output
    points = json.load(open(os.path.join(out, "sweep.json")))["points"]
    assert [(p["label"], p["status"]) for p in points] == [("original", "ok"), ("fc-lowrank mac:2", "ok")]
    assert points[1]["fc_mac_reduction"] >= 2 and points[1]["conv_macs"] == points[0]["conv_macs"]
    assert "| FC MACs / |" in open(os.path.join(out, "report.md")).read()
    tmp_path = tmp_path / "bad"
    tmp_path.mkdir()
    bad = CliRunner().invoke(main, ["sweep", model, "--data", data, "--budget", "none", "--peer", "fc-lowrank",
                                    "--fc-budget", "latency:2", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--fc-budget" in bad.output and "error:EPS or mac:R" in bad.output
    assert not os.listdir(tmp_path)


# -- named points, matched-peer placement, fewer samples for quantized points ------------------


def test_point_flags_parse_as_optimize_options():
    from gdws_onnx.cli.sweep import parse_point

    label, params = parse_point("fwd 0.005: --alphas a.npz --mismatch-budget 0.005 --width-multiple 16")
    assert label == "fwd 0.005" and params == {"alphas": "a.npz", "mismatch_budget": 0.005, "width_multiple": 16}
    label, params = parse_point("da: --data-aware 1.0 --data fashion-mnist:train --no-skip-first")
    assert params == {"data_aware": 1.0, "data": "fashion-mnist:train", "skip_first": False}
    for bad in ("no label here", "x: --batch 4", "x: --threads 2", "x: --no-such-flag", "x: --error-budget abc"):
        with pytest.raises(GDWSError):
            parse_point(bad)


def test_point_options_checked():
    with pytest.raises(GDWSError, match="distinct"):
        SweepOptions(points=(("a", {}), ("a", {"error_budget": 0.1}))).check()
    with pytest.raises(GDWSError, match="set by the sweep"):
        SweepOptions(points=(("a", {"ep": "cuda"}),)).check()
    with pytest.raises(GDWSError, match="not a GDWS point"):
        SweepOptions(budgets=("error:0.1",), match_at=("gdws error:0.2",)).check()
    with pytest.raises(GDWSError, match="n_quantized"):
        SweepOptions(n=10, n_quantized=11).check()
    SweepOptions(budgets=("error:0.1",), points=(("p", {"width_multiple": 8}),),
                 match_at=("gdws error:0.1", "gdws p"), n=10, n_quantized=5).check()


def test_named_points_matched_peers_and_quantized_samples(files, tmp_path):
    model, data = files
    out = str(tmp_path)
    opts = small_options(data, budgets=("error:0.05",), points=(("w8", {"mac_reduction": 1.5, "width_multiple": 4}),),
                         peers=("ssvd", "int8", "gdws+int8"), match_at=("gdws w8",), n_quantized=8)
    res = {p.label: p for p in sweep(model, out, opts).points}
    assert {"gdws error:0.05", "gdws w8", "int8", "original+square", "gdws w8 + int8"} <= set(res)
    assert "gdws error:0.05 + int8" not in res  # matched peers only at --match-at points
    assert [p.params["mac_reduction"] for p in res.values() if p.method == "ssvd"] == \
        [round(res["gdws w8"].conv_mac_reduction, 4)]
    direct, _ = optimize(onnx.load(model), mac_reduction=1.5, width_multiple=4, skip_first=False, verify=False, target="macs")
    assert res["gdws w8"].conv_macs == _conv_macs(direct)
    assert res["gdws w8"].params == {"mac_reduction": 1.5, "width_multiple": 4}
    for label in ("int8", "original+square", "gdws w8 + int8"):
        assert res[label].samples == 8, label
    assert res["original"].samples == res["gdws w8"].samples == N
    assert all(len(v) == 5 for p in res.values() for v in p.latency.values())
    # n_quantized is part of the quantized points' fingerprints only
    fp = {p.key: p.fingerprint for p in res.values()}
    again = {p.key: p.fingerprint for p in sweep(model, out, small_options(
        data, budgets=("error:0.05",), points=opts.points, peers=opts.peers, match_at=opts.match_at,
        n_quantized=6)).points}
    assert fp["original"] == again["original"] and fp["gdws_w8"] == again["gdws_w8"]
    assert fp["int8"] != again["int8"]


def test_within_needs_clean_and_robust_and_verdict_needs_a_bound():
    from gdws_onnx.sweep.report import speed_verdict, within

    ref = _pt("original", "original", 0.70, 1.0)
    p = _pt("a", "gdws", 0.70, 0.8)
    p.clean = 0.60  # robust kept, clean 10 points down
    s = SweepResult(model="m", model_sha256="0", options={"batches": [1]}, environment={}, points=[ref, p])
    assert not within(s, p, 1.0)
    p.clean = 0.695
    assert within(s, p, 1.0)
    assert speed_verdict([0.9, 0.8, 1.0, 0.85, 0.95]) == "faster than the original"
    assert speed_verdict([0.9, 0.8, 1.0, 0.85, 1.01]) == "not measurably faster than the original"
    assert speed_verdict([1.2, 1.1, 1.3, 1.15, 1.25]) == "slower than the original"


def test_a_named_point_that_optimize_quantizes_is_a_quantized_gdws_point(files, tmp_path):
    model, data = files
    opts = small_options(data, budgets=(), peers=(), n_quantized=8,
                         points=(("q", {"error_budget": 0.2, "quantize": "int8", "data": data, "target": "macs"}),))
    assert [s.label for s in plan_points(opts)] == ["original", "original+square", "gdws q"]
    res = {p.label: p for p in sweep(model, str(tmp_path), opts).points}
    q = res["gdws q"]
    assert q.status == "ok", q.error
    assert q.method == "gdws+int8" and q.reference == "original+square" and q.samples == 8
    assert "square" in q.robust_by_attack
    direct, _ = optimize(onnx.load(model), error_budget=0.2, skip_first=False, verify=False, target="macs")
    assert q.conv_macs == _conv_macs(direct) < res["original"].conv_macs
    saved = onnx.load(os.path.join(str(tmp_path), q.model_file))
    assert "QuantizeLinear" in {n.op_type for n in saved.graph.node}


def test_spatial_svd_named_points_float_and_int8(files, tmp_path):
    """A named point with conv=ssvd is a spatial SVD point built by optimize (quantized: spatial SVD +
    INT8, attacked like the other quantized points); the report names the method."""
    from gdws_onnx.cli.sweep import parse_point

    model, data = files
    label, params = parse_point("e0.3: --conv ssvd --error-budget 0.3 --no-skip-first --target macs")
    assert params == {"conv": "ssvd", "error_budget": 0.3, "skip_first": False, "target": "macs"}
    opts = small_options(data, budgets=(), peers=(), n_quantized=8,
                         points=((label, params), ("e0.3 int8", {**params, "quantize": "int8", "data": data})))
    assert [(s.label, s.method) for s in plan_points(opts)] == [
        ("original", "original"), ("ssvd e0.3", "ssvd"), ("original+square", "original"),
        ("ssvd e0.3 int8", "ssvd+int8")]
    result = sweep(model, str(tmp_path), opts)
    res = {p.label: p for p in result.points}
    f, q = res["ssvd e0.3"], res["ssvd e0.3 int8"]
    assert f.status == q.status == "ok", (f.error, q.error)
    direct, report = optimize(onnx.load(model), conv="ssvd", error_budget=0.3, skip_first=False, verify=False, target="macs")
    assert f.conv_macs == _conv_macs(direct) == report.conv_macs_after < res["original"].conv_macs
    assert q.conv_macs == f.conv_macs and q.reference == "original+square" and q.samples == 8
    assert "square" in q.robust_by_attack
    files_ = write_report(result, str(tmp_path))
    assert "spatial SVD + INT8" in open(files_.markdown).read()
    with pytest.raises(GDWSError, match="not a point's conv rewrite"):
        SweepOptions(points=(("off", {"conv": "off"}),)).check()
    with pytest.raises(GDWSError, match="not a GDWS point"):
        SweepOptions(points=(("e", params),), match_at=("gdws e",)).check()


def test_a_gdws_point_with_no_conv_rewritten_says_so():
    from gdws_onnx.sweep.report import unchanged_note

    q = _pt("q", "gdws+int8", 0.7, 0.3)
    q.conv_mac_reduction = 1.0
    assert unchanged_note(q) == "; no conv rewritten: INT8 alone"
    q.method = "gdws"
    assert unchanged_note(q) == "; no conv rewritten: the original"
    q.conv_mac_reduction = 1.2
    assert unchanged_note(q) == ""
    q.method, q.conv_mac_reduction = "int8", 1.0
    assert unchanged_note(q) == ""


# -- accuracy in shards, here or on Ray (issue 26) --------------------------------------------


def _accuracy(result) -> dict:
    return {p.label: (p.samples, p.clean, p.robust, p.robust_by_attack, p.agreement, p.robust_mcnemar_p)
            for p in result.points}


def test_sweep_in_shards_gives_the_same_numbers_here_and_on_ray(files, ray_local, tmp_path):
    """shard_size: every point's accuracy in seeded shards, as `evaluate` does; the numbers are the
    same whether the shards run in this process or as Ray tasks, and latency is timed here."""
    from gdws_onnx.eval.ray_runner import RayRunner

    model, data = files
    opts = dict(budgets=("error:0.05",), peers=(), shard_size=N // 2)
    here = sweep(model, str(tmp_path / "here"), small_options(data, **opts))
    on_ray = sweep(model, str(tmp_path / "ray"), small_options(data, **opts), runner=RayRunner(threads=1))
    assert _accuracy(here) == _accuracy(on_ray) and len(here.points) == 2
    assert all(p.status == "ok" and p.samples == N and p.latency for p in on_ray.points)
    with pytest.raises(GDWSError, match="shard_size"):
        sweep(model, str(tmp_path / "x"), small_options(data, **{**opts, "shard_size": None}),
              runner=RayRunner(threads=1))


def test_sweep_workers_without_ray_exits_2(files, tmp_path):
    model, data = files
    r = CliRunner().invoke(main, ["sweep", model, "--data", data, "--n", "4", "--out", str(tmp_path), "--workers", "2"])
    assert r.exit_code == 2 and "--workers needs --ray" in r.output, r.output
