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


def _ratio(median, lo, hi, rounds=50):
    from gdws_onnx.runtime.bench import Ratio
    return Ratio("a", "b", median, lo, hi, ci_low=lo, ci_high=hi, rounds=rounds, confidence=0.95)


def test_ratio_table_states_the_ci_and_the_verdict_it_supports():
    from rich.console import Console

    from gdws_onnx.cli.bench import ratio_table
    from gdws_onnx.runtime.bench import LatencyStats, Ratio

    stats = [LatencyStats(n, 1.0, 1.1, 1.2, 1000.0, 1) for n in ("a", "b", "c", "d", "e")]
    ratios = [_ratio(0.8, 0.78, 0.82), _ratio(1.2, 1.1, 1.3), _ratio(0.97, 0.9, 1.02),
              Ratio("a", "e", 0.5, 0.4, 0.6, rounds=3, confidence=0.95)]  # 3 rounds: no interval
    con = Console(width=200, record=True)
    con.print(ratio_table(stats, ratios, "t"))
    rows = {ln.split("│")[1].strip(): ln for ln in con.export_text().splitlines() if ln.count("│") > 5}
    assert "[0.780-0.820]" in rows["b"] and "faster" in rows["b"]
    assert "slower" in rows["c"]
    assert "not distinguishable" in rows["d"]
    assert "too few rounds" in rows["e"] and "not distinguishable" in rows["e"]  # no CI: no verdict
