"""Rebuild models/manifest.json from the committed .onnx files and their training logs.

    python -m models.manifest            # rewrite models/manifest.json
    python -m models.manifest --check    # exit 1 if manifest.json is out of date

For every models/logs/NAME.json whose ONNX file exists in models/, the entry holds: file,
sha256, dataset, architecture, training recipe, training wall time, clean and PGD-20 accuracy
(measured in onnxruntime by models.train), input/output names and shapes, and per Conv the
fraction of weight energy kept by the top 1/2/4 per-input-channel ranks: for W (M x C x kh x kw)
and each channel c, s_c = singular values of the M x (kh*kw) block W[:, c];
kept(r) = sum_c sum_{i<r} s_ci^2 / ||W||_F^2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gdws_onnx.graph.model_io import file_sha256

MODELS_DIR = Path(__file__).resolve().parent
RANKS = (1, 2, 4)

try:  # the core package's per-channel SVD, when present
    from gdws_onnx.core.decompose import energy_kept as _energy_kept
    from gdws_onnx.core.decompose import spectrum as _spectrum
except ImportError:  # pragma: no cover - fallback used before gdws_onnx.core.decompose existed
    _spectrum = _energy_kept = None


def energy_kept_by_rank(weight: np.ndarray, ranks: tuple[int, ...] = RANKS, groups: int = 1) -> dict[int, float]:
    """Fraction of ||W||_F^2 kept by the top-r terms of every input channel's block, per r."""
    if _spectrum is not None:
        spec = _spectrum(weight, groups)
        return {r: _energy_kept(spec, r) for r in ranks}
    m, cg = weight.shape[:2]
    k = int(np.prod(weight.shape[2:]))
    mg = m // groups
    blocks = np.asarray(weight, np.float64).reshape(groups, mg, cg, k).transpose(0, 2, 1, 3).reshape(-1, mg, k)
    s2 = np.linalg.svd(blocks, compute_uv=False) ** 2
    total = s2.sum()
    return {r: float(s2[:, :r].sum() / total) if total > 0 else 1.0 for r in ranks}


def _shape(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.dim_param else int(d.dim_value) for d in vi.type.tensor_type.shape.dim]


def signature(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """Graph inputs (not initializers) and outputs: name, shape (dim_param for symbolic), elem type."""
    inits = {t.name for t in model.graph.initializer}

    def desc(vi: onnx.ValueInfoProto) -> dict:
        return {"name": vi.name, "shape": _shape(vi),
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name}

    return {"inputs": [desc(v) for v in model.graph.input if v.name not in inits],
            "outputs": [desc(v) for v in model.graph.output]}


def conv_spectra(model: onnx.ModelProto) -> list[dict]:
    inits = {t.name: t for t in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        kept = energy_kept_by_rank(w, RANKS, groups)
        rows.append({"node": node.name, "weight": node.input[1], "shape": list(w.shape), "groups": int(groups),
                     **{f"energy_top{r}": round(kept[r], 6) for r in RANKS}})
    return rows


def entry(onnx_path: Path, log: dict) -> dict:
    model = onnx.load(str(onnx_path))
    test = log.get("test", {})
    return {
        "name": log.get("name", onnx_path.stem),
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        "dataset": log.get("dataset"),
        "architecture": log.get("architecture"),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": int(model.ir_version),
        **signature(model),
        "recipe": log.get("recipe"),
        "wall_time_train_s": log.get("wall_time_train_s"),
        "threads": log.get("threads"),
        "accuracy": {
            "split": "test", "n": test.get("n"),
            "clean": test.get("clean_acc"), "pgd20": test.get("pgd_acc"),
            "pgd20_torch": test.get("pgd_acc_torch"), "pgd": test.get("pgd"),
            "scored_by": "onnxruntime",
        },
        "export_parity_max_abs": log.get("export_parity_max_abs"),
        "conv_layers": conv_spectra(model),
        # raw conv weights at initialization (BN is the identity there), from the training log
        "conv_energy_at_init": next((e["convs"] for e in log.get("spectra_per_epoch", []) if e["epoch"] == 0), None),
        "log": f"logs/{log.get('name', onnx_path.stem)}.json",
    }


def build_manifest(models_dir: Path = MODELS_DIR) -> dict:
    entries = []
    for log_path in sorted((models_dir / "logs").glob("*.json")):
        log = json.loads(log_path.read_text())
        onnx_path = models_dir / log.get("file", log_path.stem + ".onnx")
        if onnx_path.is_file():
            entries.append(entry(onnx_path, log))
    return {"generated_by": "python -m models.manifest", "energy_ranks": list(RANKS), "models": entries}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.manifest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(MODELS_DIR))
    p.add_argument("--check", action="store_true", help="fail if manifest.json differs from a rebuild")
    a = p.parse_args(argv)
    d = Path(a.dir)
    text = json.dumps(build_manifest(d), indent=1) + "\n"
    out = d / "manifest.json"
    if a.check:
        same = out.is_file() and out.read_text() == text
        print("manifest.json is up to date" if same else "manifest.json is OUT OF DATE")
        return 0 if same else 1
    out.write_text(text)
    print(f"wrote {out} ({len(json.loads(text)['models'])} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
