"""gdws_onnx.data: IDX parsing, Fashion-MNIST, .npz, image folders, load_dataset."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from gdws_onnx import data
from gdws_onnx.data import DataError, Dataset, load_dataset, load_fashion_mnist, load_idx, load_npz


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dt).tobytes()


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32)])
def test_idx_roundtrip(tmp_path, gz, code, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 120, size=(5, 4, 3))).astype(dtype)
    raw = idx_bytes(arr, code)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    p.write_bytes(gzip.compress(raw) if gz else raw)
    out = load_idx(p)
    assert out.shape == (5, 4, 3)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda b: b[:-1], "size mismatch"),  # truncated payload
        (lambda b: b + b"\x00", "size mismatch"),  # trailing garbage
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "type code"),
        (lambda b: b[:3] + b"\x05" + b[4:], "IDX"),  # more dims than the header holds
        (lambda b: b[:2], "too short"),
    ],
)
def test_idx_corrupted(tmp_path, mutate, msg):
    raw = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)
    p = tmp_path / "bad.idx"
    p.write_bytes(mutate(raw))
    with pytest.raises(ValueError, match=msg):
        load_idx(p)


def test_idx_truncated_gzip(tmp_path):
    raw = gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8), 0x08))
    p = tmp_path / "bad.idx.gz"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError):
        load_idx(p)


def test_fashion_mnist_synthetic_plain_names(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, size=(7, 28, 28)).astype(np.uint8)
    labels = np.arange(7, dtype=np.uint8) % 10
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(imgs, 0x08))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 0x08))
    x, y = load_fashion_mnist("test", root=str(tmp_path))
    assert x.shape == (7, 1, 28, 28) and x.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0] * 255.0, imgs, atol=1e-4)
    np.testing.assert_array_equal(y, labels)


def test_fashion_mnist_missing_names_debian_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=str(tmp_path))
    assert issubclass(DataError, ValueError)
    with pytest.raises(ValueError):
        load_fashion_mnist("valid", root=str(tmp_path))


def test_fashion_mnist_debian_files(fashion_mnist):
    for split, n in (("test", 10_000), ("train", 60_000)):
        prefix = "t10k" if split == "test" else "train"
        raw_path = next(p for p in (fashion_mnist / f"{prefix}-images-idx3-ubyte.gz",
                                    fashion_mnist / f"{prefix}-images-idx3-ubyte")
                        if p.is_file())
        with (gzip.open(raw_path, "rb") if raw_path.suffix == ".gz" else open(raw_path, "rb")) as f:
            magic, count, rows, cols = struct.unpack(">4I", f.read(16))
        assert magic == 0x803 and (count, rows, cols) == (n, 28, 28)
        x, y = load_fashion_mnist(split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert y.shape == (n,) and y.dtype == np.int64
        assert set(np.unique(y)) == set(range(10))
        assert np.bincount(y).tolist() == [n // 10] * 10


def test_load_dataset_fashion_mnist_first_n(fashion_mnist):
    ds = load_dataset("fashion-mnist:test", n=100)
    assert isinstance(ds, Dataset) and len(ds) == 100
    np.testing.assert_array_equal(ds.indices, np.arange(100))
    x, y = load_fashion_mnist("test")
    np.testing.assert_array_equal(ds.x, x[:100])
    np.testing.assert_array_equal(ds.y, y[:100])
    assert load_dataset("fashion-mnist", n=5).name == "fashion-mnist:test"


def test_npz(tmp_path):
    x = np.random.default_rng(0).random((6, 3, 4, 4)).astype(np.float64)
    y = np.arange(6, dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    xx, yy = load_npz(tmp_path / "d.npz")
    assert xx.dtype == np.float32 and yy.dtype == np.int64
    np.testing.assert_allclose(xx, x, rtol=1e-6)
    np.savez(tmp_path / "nolabel.npz", x=x)
    assert load_npz(tmp_path / "nolabel.npz")[1] is None
    ds = load_dataset(str(tmp_path / "d.npz"), n=4)
    assert ds.x.shape == (4, 3, 4, 4) and ds.y.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "wrong.npz", images=x)
    with pytest.raises(DataError, match="'x'"):
        load_npz(tmp_path / "wrong.npz")
    with pytest.raises(DataError):
        load_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(DataError):
        load_dataset("cifar-10")


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = {}
    for cls in ("cat", "ant"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            a = rng.integers(0, 256, size=(6, 5, 3)).astype(np.uint8)
            Image.fromarray(a, "RGB").save(tmp_path / cls / f"{i}.png")
            pixels[(cls, i)] = a
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    x, y, names = data.load_image_folder(tmp_path)
    assert names == ["ant", "cat"]
    assert x.shape == (4, 3, 6, 5) and x.dtype == np.float32
    assert y.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(x[2].transpose(1, 2, 0) * 255, pixels[("cat", 0)], atol=1e-3)
    xr, _, _ = data.load_image_folder(tmp_path, size=4, mean=0.5, std=0.25)
    assert xr.shape == (4, 3, 4, 4)
    assert float(xr.min()) >= -2.0 - 1e-6 and float(xr.max()) <= 2.0 + 1e-6
    ds = load_dataset(str(tmp_path))
    assert ds.class_names == ["ant", "cat"] and len(ds) == 4


def test_image_folder_grayscale(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((3, 3), 255, np.uint8), "L").save(tmp_path / "a" / "x.png")
    x, y, _ = data.load_image_folder(tmp_path)
    assert x.shape == (1, 1, 3, 3) and float(x.max()) == 1.0


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("no PIL")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="pip install pillow"):
        data.load_image_folder(tmp_path)


def test_readme_test_command_is_what_ci_runs_and_installs_the_data():
    """A fresh machine gets the data set from the README's test command, the same one CI runs."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ci = re.search(r"^TEST_COMMAND='(.+)'$", (root / ".ci" / "run").read_text(), re.M)
    assert ci, ".ci/run must define TEST_COMMAND='...'"
    command = ci.group(1)
    assert f"\n    {command}\n" in (root / "README.md").read_text()
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in command
    assert command.endswith("python -m pytest")
