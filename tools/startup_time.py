"""Start-up cost of the CLI: `onnx-gdws --help` against `import onnx`, and `onnx-gdws optimize`
end to end against a plain onnx load+save of the same model, each in fresh processes.

    python tools/startup_time.py [--runs 9] [--model M.onnx] [--mac-reduction 2] [--importtime]

Without --model it builds the random-weight ImageNet ResNet-50 of models/reference.py (about
25.5 M parameters) in a temporary folder. Each comparison alternates its two commands run by
run (A B A B ...), so drifting machine load hits both alike, and prints each one's median and
the median of the per-pair ratios B/A with its 10-90 % spread. optimize runs with --no-verify:
verification runs ONNX Runtime on both models, a cost of its own that is not start-up.
Targets (issue 16): --help <= 3x import onnx; optimize <= 2x load+save.
--importtime also prints the slowest imports of `import gdws_onnx.cli` (python -X importtime).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLI = [sys.executable, "-c", "import sys; from gdws_onnx.cli import main; sys.exit(main())"]
LOAD_SAVE = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"


def _time(cmd: list[str]) -> float:
    """Wall seconds of one run of `cmd` (which must succeed)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    return time.perf_counter() - t0


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def compare(label_a: str, cmd_a: list[str], label_b: str, cmd_b: list[str], runs: int, target: float) -> None:
    """Interleave A and B `runs` times (after one untimed warm-up each) and print medians and B/A."""
    _time(cmd_a), _time(cmd_b)
    a, b = [], []
    for _ in range(runs):
        a.append(_time(cmd_a))
        b.append(_time(cmd_b))
    ratios = [y / x for x, y in zip(a, b)]
    print(f"{label_a:28s} median {statistics.median(a):.3f} s  (runs: {', '.join(f'{x:.2f}' for x in a)})")
    print(f"{label_b:28s} median {statistics.median(b):.3f} s  (runs: {', '.join(f'{x:.2f}' for x in b)})")
    r = statistics.median(ratios)
    print(f"  ratio {label_b} / {label_a}: median {r:.2f}x [p10 {_quantile(ratios, 0.1):.2f} - "
          f"p90 {_quantile(ratios, 0.9):.2f}], target <= {target:g}x: {'met' if r <= target else 'NOT met'}")


def importtime(top: int = 15) -> None:
    """The `top` imports of `import gdws_onnx.cli` with the largest cumulative time."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gdws_onnx.cli"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stderr
    rows = []
    for line in err.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            if parts[2].strip() == "site" and parts[2].startswith(" site"):
                rows = []  # interpreter start-up ends with `site`: keep only what the import adds
                continue
            rows.append((int(parts[1]), parts[2].strip()))
    print(f"import gdws_onnx.cli: {rows[-1][0] / 1e6:.3f} s cumulative; slowest imports (cumulative):")
    for us, name in sorted(rows, reverse=True)[:top]:
        print(f"  {us / 1e6:7.3f} s  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--model", default=None, help="ONNX model for the optimize comparison "
                                                  "(default: models.reference resnet50)")
    ap.add_argument("--mac-reduction", type=float, default=2.0)
    ap.add_argument("--importtime", action="store_true")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), python {platform.python_version()}, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.importtime:
        importtime()
    compare("import onnx", [sys.executable, "-c", "import onnx"], "onnx-gdws --help", CLI + ["--help"],
            args.runs, 3.0)
    with tempfile.TemporaryDirectory() as tmp:
        src = args.model
        if src is None:
            import onnx

            from models.reference import build_reference

            src = os.path.join(tmp, "resnet50.onnx")
            onnx.save(build_reference("resnet50"), src)
            print("model: models.reference resnet50 (random weights)")
        else:
            print(f"model: {src}")
        out = os.path.join(tmp, "out.onnx")
        compare("onnx load+save", [sys.executable, "-c", LOAD_SAVE, src, out],
                "onnx-gdws optimize", CLI + ["optimize", src, "-o", out, "--mac-reduction", str(args.mac_reduction),
                                             "--no-verify", "-q"], args.runs, 2.0)


if __name__ == "__main__":
    main()
