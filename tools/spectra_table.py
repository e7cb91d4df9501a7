"""Does training create the low-rank structure GDWS needs? Per-conv spectra, epoch by epoch.

    python tools/spectra_table.py models/logs/vgg16_fmnist_fgsm.json [--epochs 0,1,5,10]
    python tools/spectra_table.py A.json --versus B.json [--top 4]   # two runs side by side

The second form compares two training runs of one architecture (another weight decay, say):
per conv and epoch, the top-k energy of A / B, and the validation accuracy of both per epoch.

For each 3x3 conv: the fraction of ||W||^2 kept by the top 1/2/4 of 9 per-input-channel ranks
(what GDWS with 1/2/4 depthwise filters per channel keeps), from the training log's
`spectra_per_epoch` (raw conv weights before BatchNorm folding; epoch 0 = initialization), and,
when the exported ONNX file is beside the log's model folder, of the exported (BN-folded) weights,
which are what `onnx-gdws` decomposes. At initialization BN is the identity, so epoch 0 is also
the folded spectrum at init.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folded_spectra(onnx_path: Path) -> list[list[float]]:
    """Top-1/2/4 energy of every 3x3 conv of the exported model, in graph order."""
    import onnx

    from models.manifest import conv_spectra

    rows = conv_spectra(onnx.load(str(onnx_path)))
    return [[r["energy_top1"], r["energy_top2"], r["energy_top4"]] for r in rows if r["shape"][2:] == [3, 3]]


TOPS = (1, 2, 4)


def versus_table(a: dict, b: dict, top: int, epochs: list[int] | None) -> str:
    """Per conv, the top-`top` energy of run a / run b at each epoch both logged, then per epoch
    each run's validation clean / robust accuracy, as Markdown."""
    ea = {e["epoch"]: e["convs"] for e in a["spectra_per_epoch"]}
    eb = {e["epoch"]: e["convs"] for e in b["spectra_per_epoch"]}
    shown = [e for e in (epochs or sorted(set(ea) & set(eb))) if e in ea and e in eb]
    k = TOPS.index(top)
    label = f"{_recipe(a)} / {_recipe(b)}"
    lines = [f"top-{top} of 9 energy, {label}:", "", "| conv | " + " | ".join(f"ep{e}" for e in shown) + " |",
             "|" + "---|" * (len(shown) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{ea[e][name][k]:.2f} / {eb[e][name][k]:.2f}" for e in shown) + " |"
              for name in ea[shown[0]]]
    ha = {h["epoch"]: h for h in a.get("history", [])}
    hb = {h["epoch"]: h for h in b.get("history", [])}
    both = [e for e in sorted(set(ha) & set(hb)) if e in shown]
    if both:
        lines += ["", f"validation clean / robust %, {label}:", "",
                  "| epoch | " + " | ".join(str(e) for e in both) + " |", "|" + "---|" * (len(both) + 1),
                  "| clean | " + " | ".join(f"{_val(ha[e], 'clean')} / {_val(hb[e], 'clean')}" for e in both) + " |",
                  "| robust | " + " | ".join(f"{_val(ha[e], 'robust')} / {_val(hb[e], 'robust')}" for e in both)
                  + " |"]
    return "\n".join(lines)


def _recipe(log: dict) -> str:
    r = log.get("recipe", {})
    return f"wd {r.get('wd'):g}" if r.get("wd") is not None else log.get("name", "?")


def _val(h: dict, kind: str) -> str:
    """A history entry's validation accuracy: kind 'clean' (val_clean) or 'robust' (val_pgd*)."""
    prefix = "val_clean" if kind == "clean" else "val_pgd"
    v = next((h[k] for k in h if k.startswith(prefix)), None)
    return "-" if v is None else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--epochs", default=None, help="comma-separated epochs to show (default: 0, every 2nd, last)")
    p.add_argument("--versus", default=None, metavar="LOG", help="a second run's log: compare the two")
    p.add_argument("--top", type=int, default=4, choices=TOPS, help="with --versus: which top-k energy (default 4)")
    a = p.parse_args(argv)
    log = json.loads(Path(a.log).read_text())
    if a.versus:
        other = json.loads(Path(a.versus).read_text())
        print(versus_table(log, other, a.top, [int(e) for e in a.epochs.split(",")] if a.epochs else None))
        return 0
    per_epoch = {e["epoch"]: e["convs"] for e in log.get("spectra_per_epoch", [])}
    if not per_epoch:
        print(f"{a.log} has no spectra_per_epoch (trained before the log recorded them)")
        return 1
    last = max(per_epoch)
    epochs = ([int(e) for e in a.epochs.split(",")] if a.epochs else
              sorted({0, *range(2, last + 1, 2), last}))
    onnx_path = Path(a.log).resolve().parents[1] / log.get("file", "")
    folded = folded_spectra(onnx_path) if onnx_path.is_file() and log.get("file") else None
    names = list(per_epoch[0])
    head = ["conv", *[f"ep{e} top1/2/4" for e in epochs]] + (["exported (BN folded)"] if folded else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, name in enumerate(names):
        cells = ["/".join(f"{v:.2f}" for v in per_epoch[e][name]) for e in epochs if e in per_epoch]
        if folded and i < len(folded):
            cells.append("/".join(f"{v:.2f}" for v in folded[i]))
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
