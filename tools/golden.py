"""Golden `optimize` outputs for fixed inputs and options: the SHA-256 of the graph's structure
(nodes, attributes, initializer names, shapes and types) and the model's outputs on a seeded input.

The factor values themselves are not hashed: LAPACK's SVD differs in its last bits (and in the
signs of singular vectors) from one CPU's BLAS kernels to another's, so byte hashes recorded on
one machine fail on the next. The structure pins the ranks and realizations every planner chose;
the outputs (compared within 1e-4) pin the factors' values up to those bits.

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

# (case name, model file under models/, optimize keyword options); planned by MACs (deterministic):
# the default, target="latency", depends on timings and is covered by its own tests
CASES: list[tuple[str, str, dict]] = [
    ("vgg-default", "vgg_small_fgsm.onnx", {"target": "macs"}),
    ("vgg-error-0.05", "vgg_small_fgsm.onnx", {"error_budget": 0.05, "target": "macs"}),
    ("vgg-mac-2", "vgg_small_fgsm.onnx", {"mac_reduction": 2.0}),
    ("vgg-uniform-2-all", "vgg_small_fgsm.onnx", {"uniform_rank": 2, "skip_first": False}),
    ("vgg-error-0.1-w8", "vgg_small_fgsm.onnx", {"error_budget": 0.1, "width_multiple": 8, "target": "macs"}),
    ("vgg-data-aware", "vgg_small_fgsm.onnx", {"error_budget": 0.1, "data_aware": 0.5, "data": "fashion-mnist:train", "target": "macs"}),
    ("resnet-error-0.1", "resnet18_small_fgsm.onnx", {"error_budget": 0.1, "target": "macs"}),
    ("resnet-mac-1.5", "resnet18_small_fgsm.onnx", {"mac_reduction": 1.5}),
]


def structure_hash(model) -> str:
    """SHA-256 of the graph without initializer values: nodes (op, name, inputs, outputs,
    attributes), initializer names, shapes and types, I/O, IR version, opsets and metadata."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        t.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data"):
            t.ClearField(f)
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()


def outputs_on_seeded_input(model, batch: int = 2) -> list[float]:
    """The first output of `model` in ONNX Runtime on uniform [0, 1) inputs (seed 0), flattened."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) or i == 0 else d for i, d in enumerate(inp.shape)]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    return [float(v) for v in np.asarray(sess.run(None, {inp.name: x})[0]).ravel()]


def case_fingerprint(model_file: str, options: dict) -> dict:
    """The structure hash and seeded outputs of the model `optimize` returns (verification off)."""
    from gdws_onnx import optimize

    model, _ = optimize(str(ROOT / "models" / model_file), verify=False, **options)
    return {"structure": structure_hash(model), "outputs": outputs_on_seeded_input(model)}


def matches(got: dict, expected: dict, tol: float = 1e-4) -> bool:
    """Same structure, and outputs equal within tol relative to their largest magnitude."""
    import numpy as np

    a, b = np.asarray(got["outputs"]), np.asarray(expected["outputs"])
    return got["structure"] == expected["structure"] and a.shape == b.shape and \
        float(np.abs(a - b).max(initial=0.0)) <= tol * max(float(np.abs(b).max(initial=0.0)), 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite tests/golden/optimize.json")
    a = p.parse_args(argv)
    prints = {name: case_fingerprint(model, opts) for name, model, opts in CASES}
    for name, fp in prints.items():
        print(f"{name:24s} {fp['structure']} {fp['outputs'][:2]}")
    if a.write:
        GOLDEN.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
