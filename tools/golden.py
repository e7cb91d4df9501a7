"""Golden `optimize` outputs: the SHA-256 of the bytes `optimize` writes for fixed inputs and options.

    python tools/golden.py            # print the cases and their hashes
    python tools/golden.py --write    # rewrite tests/golden/optimize.json (only when a change of
                                      # output is intended; say why in the commit)

`tests/test_golden.py` recomputes every case and compares: a restructure must leave them unchanged.
The cases cover the deterministic budgets (error, MAC, uniform rank, width rounding, data-aware);
`--target latency` depends on timings and is covered by its own tests instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "optimize.json"

# (case name, model file under models/, optimize keyword options)
CASES: list[tuple[str, str, dict]] = [
    ("vgg-default", "vgg_small_fgsm.onnx", {}),
    ("vgg-error-0.05", "vgg_small_fgsm.onnx", {"error_budget": 0.05}),
    ("vgg-mac-2", "vgg_small_fgsm.onnx", {"mac_reduction": 2.0}),
    ("vgg-uniform-2-all", "vgg_small_fgsm.onnx", {"uniform_rank": 2, "skip_first": False}),
    ("vgg-error-0.1-w8", "vgg_small_fgsm.onnx", {"error_budget": 0.1, "width_multiple": 8}),
    ("vgg-data-aware", "vgg_small_fgsm.onnx", {"error_budget": 0.1, "data_aware": 0.5, "data": "fashion-mnist:train"}),
    ("resnet-error-0.1", "resnet18_small_fgsm.onnx", {"error_budget": 0.1}),
    ("resnet-mac-1.5", "resnet18_small_fgsm.onnx", {"mac_reduction": 1.5}),
]


def case_hash(model_file: str, options: dict) -> str:
    """SHA-256 of the serialized model `optimize` returns (verification off: it does not change it)."""
    from gdws_onnx import optimize

    model, _ = optimize(str(ROOT / "models" / model_file), verify=False, **options)
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite tests/golden/optimize.json")
    a = p.parse_args(argv)
    hashes = {name: case_hash(model, opts) for name, model, opts in CASES}
    for name, h in hashes.items():
        print(f"{name:24s} {h}")
    if a.write:
        GOLDEN.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
