"""Golden outputs: `optimize` writes byte-identical models for fixed inputs and options.

The hashes in tests/golden/optimize.json were recorded by `python tools/golden.py --write`
before the package was restructured; a refactor must not change them.
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
    assert golden.case_hash(model, options) == EXPECTED[name]
