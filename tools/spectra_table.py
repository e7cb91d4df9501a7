"""Does training create the low-rank structure GDWS needs? Per-conv spectra, epoch by epoch.

    python tools/spectra_table.py models/logs/vgg16_fmnist_fgsm.json [--epochs 0,1,5,10] [--markdown]

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--epochs", default=None, help="comma-separated epochs to show (default: 0, every 2nd, last)")
    a = p.parse_args(argv)
    log = json.loads(Path(a.log).read_text())
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
