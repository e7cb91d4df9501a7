"""Loading models with clear errors, and writing them atomically (external data preserved)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from gdws_onnx.errors import GDWSError, OptionError
from gdws_onnx.files import atomic_write

PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class LoadedModel:
    """A model and where it came from (base_dir resolves external-data locations)."""

    model: onnx.ModelProto
    path: str | None
    base_dir: str
    external_data: bool  # the input kept tensors in external files


def load_model(path: str) -> LoadedModel:
    """Read an ONNX file and its external data, or raise GDWSError saying what is wrong."""
    if not os.path.exists(path):
        raise GDWSError(f"no such file: {path}")
    if os.path.isdir(path):
        raise GDWSError(f"{path} is a directory, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise GDWSError(f"{path} is not a valid ONNX model (truncated or not a protobuf): {e}") from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise GDWSError(f"{path} is not an ONNX model (no IR version or graph)")
    base_dir = os.path.dirname(os.path.abspath(path))
    external = [t for t in external_data_helper._get_all_tensors(model)
                if external_data_helper.uses_external_data(t)]
    for t in external:
        info = external_data_helper.ExternalDataInfo(t)
        data_path = os.path.join(base_dir, info.location)
        if not os.path.isfile(data_path):
            raise GDWSError(f"external data file '{info.location}' of tensor '{t.name}' is missing "
                            f"(looked in {base_dir})")
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, base_dir)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad input
            raise GDWSError(f"cannot read external data of {path}: {e}") from None
    return LoadedModel(model=model, path=path, base_dir=base_dir, external_data=bool(external))


def check_output_path(path: str, input_path: str | None, overwrite_input: bool = False) -> None:
    """Refuse an output that would overwrite the input, or whose folder is not writable."""
    if input_path and os.path.exists(path) and os.path.samefile(path, input_path) and not overwrite_input:
        raise OptionError(f"refusing to overwrite the input model {path} (pass {{0}})", "overwrite_input")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GDWSError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise GDWSError(f"output folder is not writable: {folder}")


def save_model(model: onnx.ModelProto, path: str, external_data: bool = False) -> None:
    """Write `model` to `path` atomically (`files.atomic_write`; with external data, a temporary
    folder beside it, then renames).

    With external_data (or a model over protobuf's 2 GB limit), tensors of 1 KiB and more go
    to `<file name>.data` beside it. Note onnx moves those tensors' bytes out of `model`.
    """
    external_data = external_data or model.ByteSize() > PROTOBUF_LIMIT
    if not external_data:
        with atomic_write(path, "wb", fsync=True) as f:
            f.write(model.SerializeToString())
        return
    # two files: onnx writes both into a temporary folder; the data file goes first, each atomically
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    location = name + ".data"
    try:
        tmp_dir = tempfile.mkdtemp(prefix=".gdws-tmp-", dir=folder)
        try:
            tmp_model = os.path.join(tmp_dir, name)
            onnx.save_model(model, tmp_model, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=location, size_threshold=1024)
            if os.path.exists(os.path.join(tmp_dir, location)):
                os.replace(os.path.join(tmp_dir, location), os.path.join(folder, location))
            os.replace(tmp_model, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    except OSError as e:
        raise GDWSError(f"cannot write {path}: {e}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
