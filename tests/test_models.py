"""The model zoo: committed ONNX files match models/manifest.json; reference builders; a training smoke test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `models` is a repo-level package, not installed with gdws_onnx
    sys.path.insert(0, str(ROOT))

from models import manifest as mf  # noqa: E402
from gdws_onnx.graph.model_io import file_sha256  # noqa: E402
from models.reference import ALIASES, BUILDERS, PARAM_COUNTS, build_reference, param_count  # noqa: E402

MODELS = ROOT / "models"
MANIFEST = MODELS / "manifest.json"
ENTRIES = json.loads(MANIFEST.read_text())["models"] if MANIFEST.is_file() else []
IDS = [e["name"] for e in ENTRIES]


def _dims(shape):
    return [d if isinstance(d, int) else 2 for d in shape]


def test_manifest_present_and_lists_every_onnx():
    if not MANIFEST.is_file():
        pytest.skip("no models/manifest.json yet")
    files = {e["file"] for e in ENTRIES}
    assert files == {p.name for p in MODELS.glob("*.onnx")}, "every committed .onnx needs a manifest entry"


@pytest.mark.parametrize("e", ENTRIES, ids=IDS)
def test_manifest_entry_matches_file(e):
    path = MODELS / e["file"]
    assert path.is_file(), f"{e['file']} listed in manifest.json but missing"
    # the paper-width VGG-16 (14.7M parameters, fp32) is the one large zoo file, committed once
    assert path.stat().st_size < (64 if e["architecture"] == "vgg16_fmnist" else 10) * 2**20
    assert file_sha256(path) == e["sha256"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.ir_version <= 10
    sig = mf.signature(model)
    assert sig["inputs"] == e["inputs"] and sig["outputs"] == e["outputs"]
    assert not any(n.op_type in ("BatchNormalization", "Softmax") for n in model.graph.node)
    for k in ("dataset", "architecture", "recipe", "wall_time_train_s", "accuracy"):
        assert e.get(k) is not None, k
    assert e["accuracy"]["scored_by"] == "onnxruntime"
    for k in ("method", "eps", "epochs", "lr", "wd", "batch", "seed"):
        assert k in e["recipe"], k


@pytest.mark.parametrize("e", ENTRIES, ids=IDS)
def test_manifest_energy_matches_weights(e):
    rows = mf.conv_spectra(onnx.load(str(MODELS / e["file"])))
    assert [r["weight"] for r in rows] == [r["weight"] for r in e["conv_layers"]]
    for got, want in zip(rows, e["conv_layers"]):
        for r in mf.RANKS:
            assert got[f"energy_top{r}"] == pytest.approx(want[f"energy_top{r}"], abs=1e-5)
        assert 0 < got["energy_top1"] <= got["energy_top2"] <= got["energy_top4"] <= 1 + 1e-9


@pytest.mark.parametrize("e", ENTRIES, ids=IDS)
def test_onnx_runs_in_onnxruntime(e):
    sess = ort.InferenceSession(str(MODELS / e["file"]), providers=["CPUExecutionProvider"])
    inp = e["inputs"][0]
    x = np.random.default_rng(0).random(_dims(inp["shape"]), dtype=np.float32)
    (y,) = sess.run(None, {inp["name"]: x})
    assert list(y.shape) == _dims(e["outputs"][0]["shape"])
    assert np.isfinite(y).all()


@pytest.mark.parametrize("e", [e for e in ENTRIES if e["dataset"] == "fashion-mnist" and e["accuracy"]["n"] == 10_000],
                         ids=lambda e: e["name"])
def test_clean_accuracy_matches_manifest(e, fashion_mnist):
    from gdws_onnx.data import load_fashion_mnist

    sess = ort.InferenceSession(str(MODELS / e["file"]), providers=["CPUExecutionProvider"])
    xt, yt = load_fashion_mnist("test")
    acc = float((sess.run(None, {e["inputs"][0]["name"]: xt[:1000]})[0].argmax(1) == yt[:1000]).mean())
    assert abs(acc - e["accuracy"]["clean"]) < 0.05  # first 1000 vs the full 10k


def test_energy_fallback_matches_definition():
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    got = mf.energy_kept_by_rank(w)
    s = np.stack([np.linalg.svd(w[:, c].reshape(8, 9).astype(np.float64), compute_uv=False) for c in range(3)])
    for r in (1, 2, 4):
        assert got[r] == pytest.approx(float((s[:, :r] ** 2).sum() / (w.astype(np.float64) ** 2).sum()), rel=1e-9)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_reference_models(name):
    m = build_reference(name)
    onnx.checker.check_model(m)
    assert param_count(m) == PARAM_COUNTS[name]
    assert m.ir_version <= 10
    assert next(o.version for o in m.opset_import if o.domain == "") == 17
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    if name != "resnet50":  # keep CI fast; resnet50 is only checked structurally
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"input": np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)})
        assert y.shape == (2, 10) and np.isfinite(y).all()


def test_reference_deterministic_and_aliases():
    a, b = build_reference("resnet18_cifar"), build_reference("resnet18")
    assert a.SerializeToString() == b.SerializeToString()
    assert set(ALIASES.values()) <= set(BUILDERS)
    with pytest.raises(ValueError):
        build_reference("alexnet")


def test_resnet50_shape():
    m = build_reference("resnet50")
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 53  # 1 stem + 16 blocks x 3 + 4 downsample
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 224, 224]


@pytest.mark.slow
def test_training_smoke(tmp_path, fashion_mnist):
    torch = pytest.importorskip("torch")
    from models import train

    out = tmp_path / "smoke.onnx"
    log = train.main(["--arch", "vgg_small", "--method", "fgsm_rs", "--epochs", "1", "--subset", "256",
                      "--limit-batches", "2", "--batch", "64", "--eval-n", "64", "--out", str(out),
                      "--log", str(tmp_path / "smoke.json"), "--ckpt", str(tmp_path / "smoke.pt")])
    assert out.is_file() and (tmp_path / "smoke.json").is_file()
    assert log["export_parity_max_abs"] < 1e-4
    assert log["test"]["max_perturbation"] <= 0.1 + 1e-6
    m = onnx.load(str(out))
    assert m.ir_version <= 10
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert torch.get_num_threads() >= 1


def test_arch_shapes():
    torch = pytest.importorskip("torch")
    from models.arch import build

    counts = {}
    for name in ("vgg_small", "resnet18_small", "vgg16", "resnet18"):
        model, shape = build(name)
        model.eval()
        with torch.no_grad():
            assert model(torch.rand(2, *shape)).shape == (2, 10)
        counts[name] = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert counts["vgg_small"] == 7 and counts["vgg16"] == 13
    assert counts["resnet18"] == counts["resnet18_small"] == 20  # 17 3x3 + 3 shortcut 1x1
