"""How long PGD-20 takes on a zoo model, and how much of it is attack bookkeeping.

Runs `gdws_onnx.eval.attacks.pgd` (white-box, gradients from the chosen source, decisions in ONNX
Runtime) on the first --n Fashion-MNIST test images and splits the wall time into time inside
the model (ORT forwards + gradient-source calls) and everything else (projection, sign steps,
candidate tracking, batching). The target is overhead <= 20 % of the total.

    python tools/bench_attack.py models/vgg_small_fgsm.onnx --n 1000 [--gdws-error-budget 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx  # noqa: E402

from gdws_onnx import optimize  # noqa: E402
from gdws_onnx.eval.attacks import AttackSettings, pgd  # noqa: E402
from gdws_onnx.runtime.bench import BenchConfig, environment  # noqa: E402
from gdws_onnx.data import load_dataset  # noqa: E402
from gdws_onnx.eval.gradients import OrtClassifier, make_source  # noqa: E402


def run(model: onnx.ModelProto, label: str, x, y, source: str, batch: int, steps: int) -> dict:
    clf = OrtClassifier(model, batch_size=batch)
    src = make_source(model, source, batch_size=batch)
    res = pgd(clf, src, x, y, AttackSettings(eps=0.1, steps=steps), batch_size=batch)
    overhead = res.seconds - res.model_seconds
    return {"model": label, "source": source, "n": len(x), "steps": steps, "batch": batch,
            "seconds": res.seconds, "model_seconds": res.model_seconds,
            "overhead_fraction": overhead / res.seconds, "robust_accuracy": float(res.robust.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--source", default="torch")
    ap.add_argument("--gdws-error-budget", type=float, default=0.05)
    a = ap.parse_args()
    ds = load_dataset("fashion-mnist:test", n=a.n)
    model = onnx.load(a.model)
    gdws, _ = optimize(model, error_budget=a.gdws_error_budget, target="macs", verify=False)
    rows = [run(model, "original", ds.x, ds.y, a.source, a.batch, a.steps),
            run(gdws, f"GDWS (error budget {a.gdws_error_budget})", ds.x, ds.y, a.source, a.batch, a.steps)]
    print(json.dumps(environment(BenchConfig())))
    for r in rows:
        print(f"{r['model']:28s} PGD-{r['steps']} on {r['n']} images ({r['source']} gradients): "
              f"{r['seconds']:.1f} s total, {r['model_seconds']:.1f} s in the model, "
              f"overhead {100 * r['overhead_fraction']:.1f} %, robust accuracy {100 * r['robust_accuracy']:.1f} %")


if __name__ == "__main__":
    main()
