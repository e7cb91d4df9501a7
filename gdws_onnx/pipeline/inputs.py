"""The arrays behind a `data` option: an .npz file, or a data set spec (fashion-mnist, an image
folder), keyed by the model's graph inputs. Used by verification, calibration and the INT8 step."""

from __future__ import annotations

import os

import numpy as np
import onnx

from gdws_onnx.data import DataError, load_dataset
from gdws_onnx.errors import OptionError, literal


def data_arrays(data: str, n: int) -> tuple[dict[str, np.ndarray], str]:
    """Arrays of a `data` option value (an .npz: all of it; a data set spec: its first n samples)
    and a description of them."""
    if data.lower().endswith(".npz"):
        if not os.path.isfile(data):
            raise OptionError(f"{{0}} file not found: {literal(data)}", "data")
        try:
            with np.load(data) as z:
                return {k: z[k] for k in z.files}, f"data file {data}"
        except (ValueError, OSError) as e:
            raise OptionError(f"cannot read {{0}} {literal(data)}: {literal(e)}", "data") from None
    try:  # a data set spec shared with validate: fashion-mnist:test, an image folder
        ds = load_dataset(data, n=n)
    except (DataError, ValueError, OSError) as e:
        raise OptionError(f"{{0}} {literal(data)}: {literal(e)}", "data") from None
    return {"x": ds.x}, f"the first {len(ds.x)} samples of {ds.name}"


def named_inputs(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Calibration arrays keyed by graph input: by name, or `x` for a single-input model."""
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) == 1 and names[0] not in arrays and "x" in arrays:
        arrays = {names[0]: arrays["x"]}
    missing = [k for k in names if k not in arrays]
    if missing:
        raise OptionError(f"{{0}} has no array for input(s) {literal(missing)}; give 'x' or arrays named after "
                          "inputs", "data")
    return {k: arrays[k] for k in names}
