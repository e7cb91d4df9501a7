"""One model's clean and white-box robust accuracy, written to JSON: the same evaluation as
`validate` and `sweep` (eval.validation.evaluate_model: attacked with its own gradients, checked
against ONNX Runtime first, every adversarial example scored in ORT), for attacks too slow to run
on two models in one command (AutoAttack, PGD-100 with restarts). Run it once per model, in
parallel if there are cores, then compare the JSONs (`--compare A.json B.json`: McNemar on the
per-sample robust correctness, same samples required).

    python tools/robust_eval.py models/vgg16_fmnist_fgsm.onnx --attack autoattack --n 100 -o aa_orig.json
    python tools/robust_eval.py fast.onnx --attack autoattack --n 100 -o aa_fast.json
    python tools/robust_eval.py --compare aa_orig.json aa_fast.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from gdws_onnx.core.stats import mcnemar_exact  # noqa: E402
from gdws_onnx.data import load_dataset  # noqa: E402
from gdws_onnx.eval.validation import ValidateOptions, check_attack_requirements, evaluate_model  # noqa: E402
from gdws_onnx.files import write_json_atomic  # noqa: E402
from gdws_onnx.provenance import json_default, versions  # noqa: E402


def evaluate(path: str, args: argparse.Namespace) -> dict:
    """The model's ModelResult as a dict, with the settings and wall time."""
    opts = ValidateOptions(data=args.data, n=args.n, attacks=tuple(args.attack), eps=args.eps, steps=args.steps,
                           restarts=args.restarts, seed=args.seed, threads=args.threads)
    check_attack_requirements(opts.attacks)
    ds = load_dataset(args.data, n=args.n)
    x, y = np.ascontiguousarray(ds.x, np.float32), np.asarray(ds.y, np.int64)
    t0 = time.perf_counter()
    res, _ = evaluate_model(onnx.load(path), path, x, y, opts, [], os.path.basename(path), None)
    return {"model": path, "settings": asdict(opts), "seconds": time.perf_counter() - t0, "versions": versions(),
            "result": asdict(res)}


def compare(a_path: str, b_path: str) -> str:
    """Both results side by side and McNemar's exact test on the per-sample robust correctness."""
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    if a["settings"] != {**b["settings"]}:
        raise SystemExit("the two runs used different settings (samples, attacks, eps ...): not comparable")
    ra, rb = a["result"], b["result"]
    p = mcnemar_exact(np.asarray(ra["robust_correct"]), np.asarray(rb["robust_correct"])).p_value
    lines = []
    for name, r in ((a["model"], ra), (b["model"], rb)):
        ci = r["robust_accuracy_interval"]
        lines.append(f"{name}: clean {100 * r['clean_accuracy']:.1f} %, robust {100 * r['robust_accuracy']:.1f} % "
                     f"[{100 * ci[0]:.1f}-{100 * ci[1]:.1f}] ({', '.join(a['settings']['attacks'])}, "
                     f"n = {len(r['predictions'])})")
    lines.append(f"robust drop {100 * (ra['robust_accuracy'] - rb['robust_accuracy']):+.1f} pp, McNemar p = {p:.3g}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("-o", "--output", help="result JSON")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two result JSONs")
    ap.add_argument("--data", default="fashion-mnist:test")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--attack", action="append", default=None, help="pgd, pgd-l2, square, autoattack (repeatable)")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return
    if not args.model or not args.output:
        ap.error("give MODEL and -o OUTPUT (or --compare A B)")
    args.attack = args.attack or ["pgd"]
    out = evaluate(args.model, args)
    write_json_atomic(args.output, out, indent=1, default=json_default)
    r = out["result"]
    print(f"{args.model}: clean {100 * r['clean_accuracy']:.1f} %, robust {100 * r['robust_accuracy']:.1f} % "
          f"({', '.join(args.attack)}, n = {args.n}) in {out['seconds']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
