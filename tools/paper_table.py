"""The table a reviewer asks for, from finished sweeps: per model, the original, GDWS at its
fastest point within 1 point of the original's robust accuracy, and each peer at its fastest
point within the same 1 point (or "none within 1 pt", with its best robust accuracy).

    onnx-gdws sweep models/vgg_small_fgsm.onnx --n 1000 --out out/sweep_vgg
    python tools/paper_table.py out/sweep_vgg [out/sweep_resnet ...] [--max-drop 1] [--md out/paper.md]

Every number is read from the sweeps' sweep.json; nothing is re-measured.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gdws_onnx.sweep.run import SweepResult, load_sweep  # noqa: E402
from gdws_onnx.sweep.report import METHOD_NAMES, baseline, batches, best_within, ok_points  # noqa: E402


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def rows(sweep: SweepResult, max_drop: float) -> list[list[str]]:
    """One row per method: its fastest point (first batch) within max_drop points of robust accuracy."""
    bs = batches(sweep)
    base = baseline(sweep)
    model = os.path.basename(sweep.model)
    out = [[model, "original", "-", "1.00", _pct(base.clean), _pct(base.robust), *["1.00"] * len(bs)]]
    methods = sorted({p.method for p in ok_points(sweep)} - {"original"}, key=list(METHOD_NAMES).index)
    for m in methods:
        p = best_within(sweep, (m,), bs[0], max_drop)
        if p is None:
            best = max((q for q in ok_points(sweep) if q.method == m and q.robust is not None),
                       key=lambda q: q.robust, default=None)
            note = f"none within {max_drop:g} pt" + (f" (best robust {_pct(best.robust)} %, {best.label})"
                                                       if best else "")
            out.append([model, METHOD_NAMES[m], note, "", "", "", *[""] * len(bs)])
            continue
        out.append([model, METHOD_NAMES[m], p.label,
                    "-" if p.conv_mac_reduction is None else f"{p.conv_mac_reduction:.2f}",
                    _pct(p.clean), _pct(p.robust),
                    *[f"{p.latency[b][0]:.2f} [{p.latency[b][1]:.2f}-{p.latency[b][2]:.2f}]" for b in bs]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep output folders (or their sweep.json)")
    ap.add_argument("--max-drop", type=float, default=1.0, help="robust accuracy points (default 1)")
    ap.add_argument("--md", default=None, help="also write the table here")
    a = ap.parse_args()
    sweeps = [load_sweep(s) for s in a.sweeps]
    bs = batches(sweeps[0])
    head = ["model", "method", "point", "conv MACs /", "clean %", "robust %",
            *[f"latency ratio {b} [p10-p90]" for b in bs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sweeps:
        lines += ["| " + " | ".join(r) + " |" for r in rows(s, a.max_drop)]
    env = sweeps[0].environment
    lines += ["", f"Fastest point (latency at {bs[0]}) within {a.max_drop:g} pt of the original's robust accuracy; "
              f"{env.get('cpu')}, {env.get('ep')} EP, ONNX Runtime {env.get('onnxruntime')}, threads "
              f"{env.get('threads')}; each latency ratio timed interleaved with the original."]
    text = "\n".join(lines)
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
