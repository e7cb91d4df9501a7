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

from gdws_onnx.sweep.results import SweepResult, load_sweep  # noqa: E402
from gdws_onnx.files import write_text_atomic  # noqa: E402
from gdws_onnx.sweep.report import (  # noqa: E402
    METHOD_NAMES, md_table, baseline, batches, best_within, ok_points, reference, speed_verdict, unchanged_note,
)


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


def _ci(lat: list[float]) -> str:
    """'0.85 [0.82-0.87]': the median with its 95 % CI (older points: their 10-90 % spread)."""
    lo, hi = lat[3:5] if len(lat) >= 5 else lat[1:3]
    return f"{lat[0]:.2f} [{lo:.2f}-{hi:.2f}]"


def answer_rows(sweep: SweepResult, max_drop: float) -> list[list[str]]:
    """The plain answer: per method and batch, its fastest point within max_drop points of the
    original's clean and robust accuracy (each against its reference: the original, or the
    original with Square added for quantized points), with the 95 % CI of its latency ratio and
    whether that makes it faster than the original."""
    out = []
    methods = sorted({p.method for p in ok_points(sweep)} - {"original"}, key=list(METHOD_NAMES).index)
    for m in methods:
        for b in batches(sweep):
            p = best_within(sweep, (m,), b, max_drop)
            if p is None:
                out.append([METHOD_NAMES[m], b, f"none within {max_drop:g} pt", "", "", "", "", ""])
                continue
            ref = reference(sweep, p)
            out.append([METHOD_NAMES[m], b, p.label + unchanged_note(p),
                        "-" if p.conv_mac_reduction is None else f"{p.conv_mac_reduction:.2f}",
                        f"{_pct(p.clean)} ({_pct(ref.clean)})", f"{_pct(p.robust)} ({_pct(ref.robust)})",
                        _ci(p.latency[b]), speed_verdict(p.latency[b]).replace(" than the original", "")])
    return out


def point_rows(sweep: SweepResult) -> list[list[str]]:
    """Every point of the sweep (failed ones with their reason), grouped by method, with the
    samples it was evaluated on and the 95 % CI of its latency ratios."""
    from gdws_onnx.sweep.report import ordered

    out = []
    for p in ordered(sweep.points):
        name = METHOD_NAMES.get(p.method, p.method)
        if p.status != "ok":
            out.append([p.label, name, "failed: " + p.error.split(":")[1].strip()[:60] if ":" in p.error else p.error[:60],
                        *[""] * (5 + len(batches(sweep)))])
            continue
        out.append([p.label, name, "-" if p.conv_mac_reduction is None else f"{p.conv_mac_reduction:.2f}",
                    f"{p.parameters / 1e6:.2f}M", str(p.samples or ""), _pct(p.clean), _pct(p.robust), _pct(p.agreement),
                    *[_ci(p.latency[b]) if b in p.latency else "-" for b in batches(sweep)]])
    return out


def points_table(sweep: SweepResult) -> str:
    """Every point, with its samples and latency CIs."""
    head = ["point", "method", "conv MACs /", "params", "n", "clean %", "robust %", "agreement %",
            *[f"latency ratio {b} [95% CI]" for b in batches(sweep)]]
    return md_table(head, point_rows(sweep))


def answer_table(sweep: SweepResult, max_drop: float) -> str:
    """Per method and batch, the fastest point within max_drop points of clean and robust accuracy."""
    head = ["method", "batch", "fastest point within 1 pt", "conv MACs /", "clean % (ref.)", "robust % (ref.)",
            "latency ratio [95% CI]", "verdict"]
    return md_table(head, answer_rows(sweep, max_drop))


def fastest_table(sweeps: list[SweepResult], max_drop: float) -> str:
    """One row per method and model of several sweeps: its fastest point within max_drop robust points."""
    bs = batches(sweeps[0])
    head = ["model", "method", "point", "conv MACs /", "clean %", "robust %",
            *[f"latency ratio {b} [p10-p90]" for b in bs]]
    env = sweeps[0].environment
    return "\n".join([md_table(head, [r for s in sweeps for r in rows(s, max_drop)]), "",
                      f"Fastest point (latency at {bs[0]}) within {max_drop:g} pt of the original's robust accuracy; "
                      f"{env.get('cpu')}, {env.get('ep')} EP, ONNX Runtime {env.get('onnxruntime')}, threads "
                      f"{env.get('threads')}; each latency ratio timed interleaved with the original."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep output folders (or their sweep.json)")
    ap.add_argument("--max-drop", type=float, default=1.0, help="robust accuracy points (default 1)")
    ap.add_argument("--md", default=None, help="also write the table here")
    ap.add_argument("--answer", action="store_true",
                    help="per method and batch: the fastest point within --max-drop points of clean AND robust "
                         "accuracy, with the 95 %% CI of its latency ratio and the verdict")
    ap.add_argument("--points", action="store_true", help="every point, with its samples and latency CIs")
    a = ap.parse_args()
    text = (points_table(load_sweep(a.sweeps[0])) if a.points else
            answer_table(load_sweep(a.sweeps[0]), a.max_drop) if a.answer else
            fastest_table([load_sweep(s) for s in a.sweeps], a.max_drop))
    print(text)
    if a.md:
        write_text_atomic(a.md, text + "\n")

if __name__ == "__main__":
    main()
