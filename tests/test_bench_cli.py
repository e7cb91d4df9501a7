"""`onnx-gdws bench` says on the console what it measured on (issue 16)."""

import json

import onnxruntime as ort

from gdws_onnx.cli import main


def test_bench_prints_its_environment(runner, cnn_path, tmp_path):
    rep = tmp_path / "b.json"
    r = runner.invoke(main, ["bench", cnn_path, "--runs", "3", "--warmup", "1", "--threads", "1",
                             "--report", str(rep)])
    assert r.exit_code == 0, r.output
    env = json.loads(rep.read_text())["runs"][0]["environment"]
    line = next(ln for ln in r.output.splitlines() if ln.startswith("cpu EP on "))
    assert env["cpu"] in line and f"({env['cpus']} logical CPUs)" in line
    assert "intra-op threads 1" in line and f"onnxruntime {ort.__version__}" in line
    assert r.output.index(line) < r.output.index("median ms")  # before the numbers it describes
