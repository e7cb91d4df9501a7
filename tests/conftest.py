import os
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from gdws_onnx import data as gdws_data

LIGHT_ZOO = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")

# Tests that need the real Fashion-MNIST request the `fashion_mnist` fixture: without the Debian
# package they skip with this reason (no synthetic stand-in: its accuracies mean nothing).
FASHION_MNIST_SKIP = "dataset-fashion-mnist not installed (apt-get install -y dataset-fashion-mnist)"
# Point the tests (and every loader they call in-process) at another Fashion-MNIST folder, e.g. an
# empty one to check that every test needing the data skips:
#   GDWS_TEST_FASHION_MNIST_ROOT=/nonexistent python -m pytest
ROOT_ENV = "GDWS_TEST_FASHION_MNIST_ROOT"
FASHION_MNIST_FILES = tuple(f"{split}-{kind}-idx{dims}-ubyte" for split in ("t10k", "train")
                            for kind, dims in (("images", 3), ("labels", 1)))


def pytest_configure(config):
    if os.environ.get(ROOT_ENV):
        gdws_data.FASHION_MNIST_ROOT = os.environ[ROOT_ENV]  # read by load_fashion_mnist at call time


def fashion_mnist_root() -> Path:
    return Path(gdws_data.FASHION_MNIST_ROOT)


def have_fashion_mnist() -> bool:
    """Both splits' image and label files (gzipped or not) are in the data root."""
    root = fashion_mnist_root()
    return all((root / f).is_file() or (root / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES)


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The Fashion-MNIST folder; skips the test when the Debian package is not installed."""
    if not have_fashion_mnist():
        pytest.skip(FASHION_MNIST_SKIP)
    return fashion_mnist_root()


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cnn_path(tmp_path):
    from builders import small_cnn

    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return str(path)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance of 2 CPUs for a module's Ray tests, shut down after."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()
