"""`evaluate` in shards (issue 26): shard seeds, merges that do not depend on the order or the
runner, resume, refused work folders and results, the Ray runner on a real local instance
(identical results, retries of a dying or failing shard), and the CLI's errors."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time

import numpy as np
import onnx
import pytest

from builders import small_cnn
from gdws_onnx.cli import main
from gdws_onnx.errors import GDWSError, OptionError
from gdws_onnx.eval.results import compare_results, load_result
from gdws_onnx.eval.sharded import (
    LocalRunner,
    evaluate,
    merge_shards,
    model_blob,
    plan_shards,
    run_shard,
    shard_seed,
)
from gdws_onnx.eval.validation import ValidateOptions

pytest.importorskip("torch")

N, SHARD = 24, 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny classifier, 24 samples (.npz) it mostly classifies right, and its single-process result."""
    from gdws_onnx.runtime.session import make_session

    root = tmp_path_factory.mktemp("evaluate")
    model = small_cnn(channels=(4, 8), size=8)
    path = str(root / "m.onnx")
    onnx.save(model, path)
    x = np.random.default_rng(0).random((N, 3, 8, 8)).astype(np.float32)
    y = make_session(model).run(None, {"x": x})[0].argmax(1)
    y[:3] = (y[:3] + 1) % 10
    data = str(root / "d.npz")
    np.savez(data, x=x, y=y)
    reference = evaluate(path, _opts(data), shard_size=SHARD)
    return {"root": root, "model": path, "data": data, "reference": reference}


def _opts(data: str, **kw) -> ValidateOptions:
    return ValidateOptions(**{"data": data, "attacks": ("pgd",), "eps": 0.05, "steps": 3, "threads": 1, **kw})


def _per_sample(result) -> tuple:
    r = result.result
    return r.predictions, r.robust_correct, result.logits, result.labels, r.robust_accuracy_by_attack


class Reversed(LocalRunner):
    """Shards in reverse order, counting what ran."""

    ran: list[int]

    def run(self, model_blob, model_path, settings, jobs, done):
        self.ran = [j.shard.index for j in jobs]
        super().run(model_blob, model_path, settings, list(reversed(jobs)), done)


# ------------------------------------------------------------------ plan and seeds

def test_shard_seeds_depend_on_the_global_seed_and_the_index_alone():
    plan = plan_shards(25, 10, seed=7)
    assert [(s.start, s.stop) for s in plan] == [(0, 10), (10, 20), (20, 25)]
    assert [s.seed for s in plan] == [shard_seed(7, i) for i in range(3)] == [s.seed for s in plan_shards(25, 10, 7)]
    assert len({s.seed for s in plan}) == 3 and shard_seed(8, 0) != shard_seed(7, 0)
    assert all(0 <= s.seed < 2 ** 32 for s in plan)
    with pytest.raises(OptionError, match="shard_size"):
        plan_shards(10, 0, 0)
    with pytest.raises(OptionError, match="seed"):
        shard_seed(-1, 0)


# ------------------------------------------------------------------ merge, resume, refusals

def test_merge_is_the_same_whatever_the_order_of_the_shards(setup):
    ref = setup["reference"]
    assert len(ref.shards) == 3 and ref.settings.n == N and len(ref.result.robust_correct) == N
    assert 0 < ref.result.robust_accuracy < ref.result.clean_accuracy < 1
    runner = Reversed(threads=1)
    again = evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD, runner=runner)
    assert runner.ran == [0, 1, 2] and _per_sample(again) == _per_sample(ref)
    # each shard alone (as a worker runs it), merged in any order
    blob, path = model_blob(setup["model"])
    data = np.load(setup["data"])
    parts = {}
    for s in reversed(plan_shards(N, SHARD, 0)):
        parts[s.index] = run_shard(blob, path, ref.settings, s, data["x"][s.start:s.stop],
                                   data["y"][s.start:s.stop].astype(np.int64), 1)
    merged = merge_shards(ref.settings, plan_shards(N, SHARD, 0), parts, path, ref.data)
    assert _per_sample(merged) == _per_sample(ref)
    with pytest.raises(GDWSError, match=r"shards \[1\] missing"):
        merge_shards(ref.settings, plan_shards(N, SHARD, 0), {0: parts[0], 2: parts[2]}, path, ref.data)


def test_resume_runs_only_the_missing_shard_and_gives_the_same_result(setup, tmp_path):
    work = tmp_path / "work"
    first = evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD, work_dir=work)
    assert sorted(os.listdir(work)) == ["settings.json", "shard_00000.json", "shard_00001.json", "shard_00002.json"]
    os.remove(work / "shard_00001.json")
    runner = Reversed(threads=1)
    resumed = evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD, work_dir=work, resume=True,
                       runner=runner)
    assert runner.ran == [1]
    assert _per_sample(resumed) == _per_sample(first) == _per_sample(setup["reference"])
    # without resume, finished shards are never silently overwritten
    with pytest.raises(OptionError, match="resume"):
        evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD, work_dir=work)


def test_work_dir_or_shard_of_other_settings_is_refused_naming_the_fields(setup, tmp_path):
    work = tmp_path / "work"
    evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD, work_dir=work)
    with pytest.raises(GDWSError, match=r"other settings.*eps 0\.1 vs 0\.05; seed 3 vs 0") as e:
        evaluate(setup["model"], _opts(setup["data"], eps=0.1, seed=3), shard_size=SHARD, work_dir=work,
                 resume=True)
    assert "steps" not in str(e.value)
    with pytest.raises(GDWSError, match="shard_size 12 vs 10"):
        evaluate(setup["model"], _opts(setup["data"]), shard_size=12, work_dir=work, resume=True)
    # a shard file copied in from another run (another seed) is refused as well
    other = tmp_path / "other"
    evaluate(setup["model"], _opts(setup["data"], seed=5), shard_size=SHARD, work_dir=other)
    os.replace(other / "shard_00001.json", work / "shard_00001.json")
    with pytest.raises(GDWSError, match=r"shard_00001.json was written under other settings.*seed 0 vs 5"):
        evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD, work_dir=work, resume=True)


def test_results_of_other_settings_are_not_compared(setup):
    ref = setup["reference"]
    other = evaluate(setup["model"], _opts(setup["data"], steps=2, n=20), shard_size=SHARD)
    with pytest.raises(GDWSError, match=r"not evaluated the same way: n 24 vs 20; steps 3 vs 2"):
        compare_results(ref, other)
    report = compare_results(ref, ref)
    assert report.robust_drop_pp == 0 and report.robust_change["lost"] == 0 and report.agreement == 1
    # Square's iterations count only where both results ran Square (here neither did)
    fewer = evaluate(setup["model"], _opts(setup["data"], queries=100), shard_size=SHARD)
    assert compare_results(ref, fewer).robust_drop_pp == 0
    with_square = dataclasses.replace(fewer, result=dataclasses.replace(
        fewer.result, robust_accuracy_by_attack={**fewer.result.robust_accuracy_by_attack, "square": 1.0}))
    both = dataclasses.replace(ref, result=dataclasses.replace(
        ref.result, robust_accuracy_by_attack={**ref.result.robust_accuracy_by_attack, "square": 1.0}))
    assert "different attacks" in " ".join(compare_results(ref, with_square).warnings)
    with pytest.raises(GDWSError, match="queries 1000 vs 100"):
        compare_results(both, with_square)


def test_a_shard_error_names_its_shard(setup, tmp_path):
    data = np.load(setup["data"])
    y = data["y"].copy()
    y[15] = 12  # more classes than the model has, in shard 1
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=data["x"], y=y)
    with pytest.raises(GDWSError, match=r"shard 1 \(samples 10-19\): .*labels go up to 12"):
        evaluate(setup["model"], _opts(str(bad)), shard_size=SHARD, work_dir=tmp_path / "w")
    assert os.path.exists(tmp_path / "w" / "shard_00000.json")  # kept for --resume


# ------------------------------------------------------------------ CLI

def _cli(runner, setup, out, *extra):
    return runner.invoke(main, ["evaluate", setup["model"], "--data", setup["data"], "--eps", "0.05", "--steps", "3",
                                "--shard-size", str(SHARD), "--threads", "1", "-o", str(out), *extra])


def test_cli_evaluate_resume_and_validate_of_results(runner, setup, tmp_path):
    out = tmp_path / "r.json"
    r = _cli(runner, setup, out)
    assert r.exit_code == 0, r.output
    assert _per_sample(load_result(out)) == _per_sample(setup["reference"])
    r = _cli(runner, setup, out)
    assert r.exit_code == 2 and "--resume" in r.output and "Traceback" not in r.output
    r = _cli(runner, setup, out, "--resume", "--eps", "0.1")
    assert r.exit_code == 2 and "eps 0.1 vs 0.05" in r.output
    r = _cli(runner, setup, out, "--resume", "-q")
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["validate", str(out), str(out), "--max-drop-robust", "0"])
    assert r.exit_code == 0, r.output
    assert "lost / gained 0 / 0" in r.output
    r = runner.invoke(main, ["validate", str(out), str(out), str(out)])
    assert r.exit_code == 0 and r.output.count("| r |") == 3, r.output


def test_cli_validate_evaluates_a_model_under_a_results_settings(runner, setup, tmp_path):
    out = tmp_path / "r.json"
    assert _cli(runner, setup, out, "-q").exit_code == 0
    r = runner.invoke(main, ["validate", str(out), setup["model"], "--report", str(tmp_path / "rep.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["robust_drop_pp"] == 0 and rep["data"]["n"] == N


def test_ray_without_the_extra_exits_2_naming_the_install(runner, setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = _cli(runner, setup, tmp_path / "r.json", "--ray")
    assert r.exit_code == 2 and 'pip install "onnx-gdws[ray]"' in r.output, r.output
    assert not (tmp_path / "r.json.shards").exists()


def test_unreachable_ray_address_fails_within_seconds(runner, setup, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    r = _cli(runner, setup, tmp_path / "r.json", f"--ray=127.0.0.1:{port}")
    assert r.exit_code == 2 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.output, r.output
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    r = _cli(runner, setup, tmp_path / "r.json", "--ray")
    assert r.exit_code == 2 and "cannot reach the Ray cluster" in r.output, r.output
    assert time.perf_counter() - t0 < 20


# ------------------------------------------------------------------ Ray, for real

# (the ray_local fixture is in conftest.py)

def test_ray_run_equals_the_single_process_run(setup, ray_local, tmp_path):
    from gdws_onnx.eval.ray_runner import RayRunner

    result = evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD, runner=RayRunner(threads=1),
                      work_dir=tmp_path / "w")
    assert result.runner == "ray" and _per_sample(result) == _per_sample(setup["reference"])
    assert len(os.listdir(tmp_path / "w")) == 4


def test_ray_reruns_a_dying_or_failing_shard_without_losing_or_doubling_samples(setup, ray_local, tmp_path):
    from gdws_onnx.eval.ray_runner import RayRunner

    flags = str(tmp_path)

    def flaky(blob, path, settings, shard, x, y, threads):
        """Shard 0's first worker dies; shard 2's first attempt raises; then they run normally."""
        import os as os_

        from gdws_onnx.eval.sharded import run_shard as real

        flag = os_.path.join(flags, f"attempt_{shard.index}")
        first = not os_.path.exists(flag)
        open(flag, "a").write("x")
        if first and shard.index == 0:
            os_._exit(1)
        if first and shard.index == 2:
            raise RuntimeError("transient")
        return real(blob, path, settings, shard, x, y, threads)

    got = []

    class Counting(RayRunner):
        def run(self, model_blob, model_path, settings, jobs, done):
            super().run(model_blob, model_path, settings, jobs, lambda r: (got.append(r.index), done(r)))

    result = evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD,
                      runner=Counting(threads=1, max_retries=2, shard_fn=flaky))
    assert sorted(got) == [0, 1, 2]
    attempts = {i: len(open(os.path.join(flags, f"attempt_{i}")).read()) for i in range(3)}
    assert attempts == {0: 2, 1: 1, 2: 2}
    assert _per_sample(result) == _per_sample(setup["reference"])


def test_ray_reports_a_shard_that_keeps_failing_with_its_shard(setup, ray_local):
    from gdws_onnx.eval.ray_runner import RayRunner

    def broken(blob, path, settings, shard, x, y, threads):
        from gdws_onnx.eval.sharded import run_shard as real

        if shard.index == 1:
            raise ValueError("always")
        return real(blob, path, settings, shard, x, y, threads)

    with pytest.raises(GDWSError, match=r"shard 1 \(samples 10-19\): ValueError: always"):
        evaluate(setup["model"], _opts(setup["data"]), shard_size=SHARD,
                 runner=RayRunner(threads=1, max_retries=1, shard_fn=broken))


def test_cli_validate_of_two_models_on_ray(runner, setup, ray_local, tmp_path):
    r = runner.invoke(main, ["validate", setup["model"], setup["model"], "--data", setup["data"], "--eps", "0.05",
                             "--steps", "3", "--shard-size", str(SHARD), "--ray", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["optimized"]["robust_correct"] == setup["reference"].result.robust_correct
    assert rep["robust_change"]["lost"] == rep["robust_change"]["gained"] == 0
