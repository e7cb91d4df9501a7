"""Golden outputs: `optimize` writes byte-identical models for fixed inputs and options.

tests/golden/optimize.json holds, per case, the hash of the graph's structure and its outputs on
a seeded input (`python tools/golden.py --write`); a refactor must change neither. Byte hashes
are not used: SVD bits differ between CPUs' BLAS kernels (tools/golden.py).
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import golden  # noqa: E402

EXPECTED = json.loads((ROOT / "tests" / "golden" / "optimize.json").read_text())


@pytest.mark.parametrize("name,model,options", golden.CASES, ids=[c[0] for c in golden.CASES])
def test_optimize_output_is_unchanged(name, model, options, request):
    if "fashion-mnist" in str(options.get("data", "")):
        request.getfixturevalue("fashion_mnist")
    got = golden.case_fingerprint(model, options)
    assert golden.matches(got, EXPECTED[name]), (got["structure"], EXPECTED[name]["structure"])
