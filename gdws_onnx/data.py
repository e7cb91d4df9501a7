"""Evaluation data sets as numpy arrays (no torch): IDX / Fashion-MNIST, .npz, image folders.

Every loader returns images as float32 N x C x H x W in [0, 1] (unless the caller asks for
normalization) and labels as int64, so an attack budget eps is in pixel space.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# IDX type codes -> big-endian numpy dtypes
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data set is missing, unreadable or malformed."""


@dataclass
class Dataset:
    """Evaluation samples: x float32 N x C x H x W, y int64 N (or None), and where they came from."""

    x: np.ndarray
    y: np.ndarray | None
    name: str
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _read_bytes(path: str | os.PathLike) -> bytes:
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":
            with gzip.open(p, "rb") as f:
                return f.read()
        return p.read_bytes()
    except (OSError, EOFError) as e:  # truncated gzip stream, bad CRC, ...
        raise ValueError(f"{p}: cannot read ({e})") from e


def parse_idx(buf: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file, validating the header against the payload size."""
    if len(buf) < 4:
        raise ValueError(f"{name}: IDX file too short ({len(buf)} bytes)")
    if buf[0] != 0 or buf[1] != 0:
        raise ValueError(f"{name}: bad IDX magic {buf[:4].hex()} (first two bytes must be 0)")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{name}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{name}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{name}: IDX header truncated (needs {header} bytes, has {len(buf)})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        raise ValueError(
            f"{name}: IDX size mismatch: header says dims {dims} of {dtype.str} "
            f"({expected} bytes in all), file has {len(buf)} bytes"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain) into a native-endian numpy array.

    Raises ValueError when the magic, data type or dimensions do not match the file size.
    """
    return parse_idx(_read_bytes(path), name=str(path))


def _find(root: Path, stem: str) -> Path | None:
    for cand in (stem + ".gz", stem):
        if (root / cand).is_file():
            return root / cand
    return None


def load_fashion_mnist(split: str = "test", root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as (x float32 N x 1 x 28 x 28 in [0, 1], y int64 N).

    split: "test" (10k) or "train" (60k). Files are read from `root`
    (default /usr/share/datasets/fashion-mnist/), gzipped or not.
    """
    prefix = {"test": "t10k", "train": "train"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown Fashion-MNIST split {split!r} (use 'test' or 'train')")
    base = Path(root if root is not None else FASHION_MNIST_ROOT)
    img_p = _find(base, f"{prefix}-images-idx3-ubyte")
    lab_p = _find(base, f"{prefix}-labels-idx1-ubyte")
    if img_p is None or lab_p is None:
        raise DataError(
            f"Fashion-MNIST {split} files not found in {base} "
            f"(expected {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]); "
            f"install them with: {FASHION_MNIST_INSTALL}"
        )
    images = load_idx(img_p)
    labels = load_idx(lab_p)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{img_p}: expected uint8 N x 28 x 28 images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{lab_p}: {labels.shape[0]} labels for {images.shape[0]} images")
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return np.ascontiguousarray(x), labels.astype(np.int64)


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read arrays `x` (float32, N x C x H x W) and optional `y` (int64) from a .npz file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise DataError(f"{path}: no array named 'x' (has {sorted(z.files)})")
            x = np.asarray(z["x"], dtype=np.float32)
            y = np.asarray(z["y"]).astype(np.int64) if "y" in z.files else None
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read .npz ({e})") from e
    if y is not None and y.shape[0] != x.shape[0]:
        raise DataError(f"{path}: {y.shape[0]} labels for {x.shape[0]} samples")
    return x, y


def load_image_folder(
    root: str | os.PathLike,
    size: tuple[int, int] | int | None = None,
    mean: tuple[float, ...] | float | None = None,
    std: tuple[float, ...] | float | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read root/<class>/<image> (classes sorted by name, files sorted) into (x, y, class_names).

    x is float32 N x C x H x W in [0, 1] (then (x - mean) / std if given); grayscale images
    give C = 1, others are converted to RGB. `size` = (height, width) or an int resizes
    every image (bilinear); without it all images must share one size. Needs Pillow.
    """
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("reading an image folder needs Pillow: pip install pillow") from e
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{base}: not a directory")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{base}: no class sub-folders")
    if isinstance(size, int):
        size = (size, size)
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        for f in sorted((base / cls).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, label))
    if not files:
        raise DataError(f"{base}: no images (suffixes {', '.join(IMAGE_SUFFIXES)})")
    with Image.open(files[0][0]) as im0:
        gray = im0.mode in ("1", "L", "I;16", "I", "F")
    mode = "L" if gray else "RGB"
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as e:
            raise DataError(f"{f}: cannot read image ({e})") from e
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if arrays and a.shape != arrays[0].shape:
            raise DataError(f"{f}: shape {a.shape} differs from {arrays[0].shape}; pass size=")
        arrays.append(a)
    x = np.stack(arrays).astype(np.float32)
    if mean is not None or std is not None:
        c = x.shape[1]
        m = np.broadcast_to(np.asarray(0.0 if mean is None else mean, np.float32), (c,))
        s = np.broadcast_to(np.asarray(1.0 if std is None else std, np.float32), (c,))
        x = (x - m[None, :, None, None]) / s[None, :, None, None]
    y = np.array([lab for _, lab in files], dtype=np.int64)
    return x, y, classes


def load_dataset(spec: str, n: int | None = None) -> Dataset:
    """Load `spec`: "fashion-mnist[:test|train]", a .npz path, or an image-folder directory.

    `n` keeps the first n samples (deterministic); the kept indices are in Dataset.indices.
    """
    class_names: list[str] | None = None
    if spec.lower().startswith("fashion-mnist"):
        _, _, split = spec.partition(":")
        x, y = load_fashion_mnist(split or "test")
        name = f"fashion-mnist:{split or 'test'}"
        class_names = list(FASHION_MNIST_CLASSES)
    elif spec.lower().endswith(".npz"):
        if not os.path.isfile(spec):
            raise DataError(f"{spec}: no such .npz file")
        x, y = load_npz(spec)
        name = spec
    elif os.path.isdir(spec):
        x, y, class_names = load_image_folder(spec)
        name = spec
    else:
        raise DataError(
            f"unknown data set {spec!r}: use fashion-mnist:test, fashion-mnist:train, "
            "a .npz file with arrays x (and y), or a folder with one sub-folder per class"
        )
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        x = x[:n]
        y = None if y is None else y[:n]
    idx = np.arange(x.shape[0], dtype=np.int64)
    return Dataset(x=np.ascontiguousarray(x), y=y, name=name, indices=idx, class_names=class_names)
