"""tools/robust_eval.py is a thin wrapper over the product (issue 26): old command lines map to
`onnx-gdws evaluate` / `validate`, and its markdown table is `eval.results.markdown_table`."""

import sys
from pathlib import Path

import pytest

from gdws_onnx.core.stats import proportion
from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.results import EvalSettings, EvaluationResult, markdown_table
from gdws_onnx.eval.validation import ModelResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import robust_eval  # noqa: E402


def _result(tmp_path, name, robust, sha="a" * 64, eps=0.1):
    n = len(robust)
    rp = proportion(robust)
    settings = EvalSettings(model_sha256=sha, data="fashion-mnist:test", n=n, shard_size=100, attacks=("autoattack",),
                            eps=eps, steps=20, step_size=None, restarts=1, random_start=True, queries=1000, seed=0,
                            gradient="auto", batch_size=128, gradient_check_samples=8)
    result = ModelResult(path=f"{name}.onnx", clean_accuracy=1.0, clean_accuracy_interval=[0.6, 1.0],
                         robust_accuracy=rp.value, robust_accuracy_interval=[rp.low, rp.high],
                         robust_accuracy_by_attack={"autoattack": rp.value}, gradient_source="torch",
                         gradient_check=None, softmax_cut=False, predictions=[0] * n, robust_correct=list(robust))
    r = EvaluationResult(model=f"{name}.onnx", settings=settings, result=result, labels=[0] * n,
                         logits=[[1.0, 0.0]] * n, attacks=[], data={"spec": "fashion-mnist:test", "n": n},
                         shards=[])
    path = tmp_path / f"{name}.json"
    r.write(path)
    return r, str(path)


def test_table_compares_each_model_with_the_first(tmp_path):
    ref, ref_path = _result(tmp_path, "original", [True, True, True, False, True, True, True, True])
    fast, fast_path = _result(tmp_path, "fast", [True, False, True, False, False, True, True, True], sha="b" * 64)
    text = markdown_table([("original", ref), ("fast", fast)])
    assert text == robust_eval.table([f"original={ref_path}", f"fast={fast_path}"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | clean % | autoattack % [95 % CI]")
    assert rows[1].startswith("| original | 100.0 | 87.5 [") and rows[1].endswith("| - | - | - |")
    assert rows[2].startswith("| fast | 100.0 | 62.5 [") and rows[2].endswith("| 2 / 0 | 0.5 |")
    assert "| -25.0 [-55.0 to +5.0] |" in rows[2]  # 2 lost, 0 gained of 8
    assert "samples 0-7" in text
    other, _ = _result(tmp_path, "other", [True] * 8, sha="c" * 64, eps=0.2)
    with pytest.raises(GDWSError, match="eps 0.1 vs 0.2"):
        markdown_table([("original", ref), ("other", other)])
    with pytest.raises(GDWSError, match="NAME=RESULT.json"):
        robust_eval.table([ref_path])


def test_old_command_lines_map_to_the_product(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(robust_eval, "cli", calls.append)
    robust_eval.main(["m.onnx", "--attack", "autoattack", "--n", "50", "-o", "r.json"])
    robust_eval.main(["--compare", "a.json", "b.json"])
    assert calls[0][:4] == ["evaluate", "m.onnx", "-o", "r.json"]
    assert ["--n", "50"] == calls[0][calls[0].index("--n"):][:2] and calls[0][-2:] == ["--attack", "autoattack"]
    assert "--resume" in calls[0] and calls[1] == ["validate", "a.json", "b.json"]
    for gone in (["m.onnx", "--start", "100", "-o", "r.json"], ["--compare", "a.json,b.json", "c.json"]):
        with pytest.raises(SystemExit) as e:
            robust_eval.main(gone)
        assert e.value.code == 2
