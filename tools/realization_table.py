"""Per-layer realization table from `optimize --target latency --report R.json` runs: for each
conv, the realization chosen (or why none), its MAC cut, its measured layer ratio with the 95 %
confidence interval of the median, speed-up / MAC cut (1 = the layer got all of its MAC cut as
speed), and the best measured ratio of every form that was timed.

    onnx-gdws optimize models/vgg16_fmnist_fgsm.onnx -o fast.onnx --target latency \\
        --mismatch-budget 0.005 --alphas alphas.npz --width-multiple 16 --batch 1 --threads 1 --report r.json
    python tools/realization_table.py r.json [--md out.md]

Every number is read from the report; nothing is re-measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gdws_onnx.files import write_text_atomic  # noqa: E402
from gdws_onnx.sweep.report import md_table  # noqa: E402


HEAD = ["layer", "C->M", "map", "G/max", "realization", "conv MACs /", "layer ratio [95% CI]",
        "speed-up / MAC cut", "best ratio of each form timed"]


def _fmt(r: dict) -> str:
    return f"{r['median']:.2f} [{r['ci_low']:.2f}-{r['ci_high']:.2f}]" if r.get("ci_low") is not None \
        else f"{r['median']:.2f}"


def rows(report: dict) -> list[list[str]]:
    """One row per conv the latency planner measured (layers it never timed are left out)."""
    measured = report["latency"]["layers"]
    out = []
    for layer in report["layers"]:
        entry = measured.get(layer["name"])
        if entry is None:
            continue
        batches = sorted({b for o in entry["options"] for b in o["ratios"]}, key=int)
        best = {}
        for o in entry["options"]:
            worst = max(o["ratios"].values(), key=lambda r: r["median"])
            if o["form"] not in best or worst["median"] < best[o["form"]][1]["median"]:
                best[o["form"]] = (o, worst)
        forms = "; ".join(f"{form} G={o['total_rank']}: {_fmt(w)}" for form, (o, w) in best.items())
        shape = f"{layer['in_channels']}->{layer['out_channels']}"
        side = int(round(layer["pixels"] ** 0.5)) if layer.get("pixels") else None
        where = f"{side}x{side}" if side and side * side == layer["pixels"] else str(layer.get("pixels"))
        if layer["status"] == "rewritten":
            chosen = entry["options"][entry["chosen"]] if entry.get("chosen") is not None else None
            cut = layer["macs_before"] / layer["macs_after"]
            ratios = chosen["ratios"] if chosen else {}
            cells = [_fmt(ratios[b]) if b in ratios else "-" for b in batches]
            eff = [f"{(1 / ratios[b]['median']) / cut:.2f}" if b in ratios else "-" for b in batches]
            out.append([layer["name"], shape, where, f"{layer['total_rank']}/{layer['max_rank'] * layer['in_channels']}",
                        layer["realization"], f"{cut:.2f}", " / ".join(cells), " / ".join(eff), forms])
        else:
            out.append([layer["name"], shape, where, "-", "dense: " + layer["reason"], "1.00", "-", "-", forms])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="optimize --report JSON files (run with --target latency)")
    ap.add_argument("--md", default=None, help="also write the table here")
    a = ap.parse_args()
    lines = []
    for path in a.reports:
        with open(path) as f:
            report = json.load(f)
        lat = report["latency"]
        bs = ", ".join(str(b) for b in lat["batches"])
        lines += [f"{path}: {lat['ep']} EP, threads {lat['threads']}, batch {bs}; whole model "
                  + "; ".join(f"b{b}: {_fmt(r)}" for b, r in lat.get("final_ratios", {}).items()), "",
                  md_table(HEAD, rows(report)), ""]
    text = "\n".join(lines)
    print(text)
    if a.md:
        write_text_atomic(a.md, text + "\n")


if __name__ == "__main__":
    main()
