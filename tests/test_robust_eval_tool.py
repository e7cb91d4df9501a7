"""tools/robust_eval.py: chunked runs merge into one result, and only chunks that belong together."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import robust_eval  # noqa: E402


def _chunk(tmp_path, start, robust, clean=1.0, model="m.onnx", eps=0.1):
    n = len(robust)
    d = {"model": model, "start": start, "seconds": 10.0,
         "settings": {"data": "fashion-mnist:test", "n": n, "attacks": ["autoattack"], "eps": eps},
         "result": {"clean_accuracy": clean, "robust_accuracy": sum(robust) / n, "predictions": [0] * n,
                    "robust_correct": robust, "robust_accuracy_interval": [0, 1]}}
    path = tmp_path / f"{model}_{start}_{eps}.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_chunks_merge_in_sample_order(tmp_path):
    b = _chunk(tmp_path, 4, [False, False, True, True], clean=0.5)
    a = _chunk(tmp_path, 0, [True, True, True, False])
    m = robust_eval.merge([b, a])
    assert m["result"]["robust_correct"] == [True, True, True, False, False, False, True, True]
    assert m["settings"]["n"] == 8 and m["seconds"] == 20.0 and m["start"] == 0
    assert m["result"]["robust_accuracy"] == pytest.approx(5 / 8)
    assert m["result"]["clean_accuracy"] == pytest.approx(6 / 8)
    lo, hi = m["result"]["robust_accuracy_interval"]
    assert lo < 5 / 8 < hi


@pytest.mark.parametrize("second,message", [
    (dict(start=5), "not contiguous"),
    (dict(start=4, model="other.onnx"), "different models"),
    (dict(start=4, eps=0.2), "different settings"),
])
def test_chunks_that_do_not_belong_together_are_refused(tmp_path, second, message):
    a = _chunk(tmp_path, 0, [True, False, True, True])
    b = _chunk(tmp_path, robust=[True, True], **second)
    with pytest.raises(SystemExit, match=message):
        robust_eval.merge([a, b])


def test_threads_do_not_keep_chunks_apart(tmp_path):
    a = _chunk(tmp_path, 0, [True, False])
    b = _chunk(tmp_path, 2, [True, True], model="m.onnx")
    d = json.loads(open(b).read())
    d["settings"]["threads"] = 2
    open(b, "w").write(json.dumps(d))
    assert robust_eval.merge([a, b])["result"]["robust_correct"] == [True, False, True, True]


def test_compare_needs_the_same_samples(tmp_path):
    a = _chunk(tmp_path, 0, [True, True, False, True])
    b = _chunk(tmp_path, 0, [True, False, False, True], model="g.onnx")
    assert "McNemar p = 1" in robust_eval.compare(a, b)
    c = _chunk(tmp_path, 4, [True, True, False, True], model="g.onnx")
    with pytest.raises(SystemExit, match="different settings"):
        robust_eval.compare(a, c)


def test_table_compares_each_model_with_the_first(tmp_path):
    ref = ",".join([_chunk(tmp_path, 0, [True, True, True, False]), _chunk(tmp_path, 4, [True, True, True, True])])
    fast = ",".join([_chunk(tmp_path, 0, [True, False, True, False], model="f.onnx"),
                     _chunk(tmp_path, 4, [False, True, True, True], model="f.onnx")])
    text = robust_eval.table([f"original={ref}", f"fast={fast}"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | clean % | autoattack % [95 % CI]")
    assert rows[1].startswith("| original | 100.0 | 87.5 [") and rows[1].endswith("| - | - | - |")
    assert rows[2].startswith("| fast | 100.0 | 62.5 [") and rows[2].endswith("| 2 / 0 | 0.5 |")
    assert "| -25.0 [-55.0 to +5.0] |" in rows[2]  # 2 lost, 0 gained of 8
    assert "test images 0-7" in text
    short = _chunk(tmp_path, 0, [True, False], model="s.onnx")
    with pytest.raises(SystemExit, match="different settings"):
        robust_eval.table([f"original={ref}", f"short={short}"])
    with pytest.raises(SystemExit, match="NAME=JSON"):
        robust_eval.table([ref])
