import os

import onnx
import pytest
from click.testing import CliRunner

LIGHT_ZOO = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cnn_path(tmp_path):
    from builders import small_cnn

    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return str(path)
