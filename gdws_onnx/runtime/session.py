"""ONNX Runtime sessions, inputs for them, and output comparison (no CLI, no graph edits)."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from gdws_onnx.errors import GDWSError, OptionError

ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """Session options with intra-op spinning off by default (fair when sessions alternate)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def make_session(model: onnx.ModelProto | str, threads: int | None = None,
                 providers: list | None = None) -> ort.InferenceSession:
    """A CPU (or given-provider) session for a model object or a path.

    A model object over protobuf's 2 GB limit is written to a temporary folder with
    external data first (ONNX Runtime reads it all while the session is created)."""
    try:
        if isinstance(model, str) or model.ByteSize() < 2**31 - 1:
            src = model if isinstance(model, str) else model.SerializeToString()
            return ort.InferenceSession(src, session_options(threads),
                                        providers=providers or ["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as tmp:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data moves bytes out of the proto
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(copy, path, save_as_external_data=True, location="model.data")
            return make_session(path, threads, providers)
    except GDWSError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises several types for unloadable models
        raise GDWSError(f"ONNX Runtime cannot load the model: {e}") from None


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """'name:1,3,224,224' strings -> {name: [1, 3, 224, 224]} (a name may contain ':')."""
    shapes = {}
    for spec in specs:
        m = re.fullmatch(r"(.+):(\d+(?:,\d+)*)", spec.strip())
        if not m:
            raise OptionError(f"bad {{0}} '{spec}': expected NAME:D1,D2,... e.g. input:1,3,224,224",
                              "input_shapes")
        shapes[m.group(1)] = [int(d) for d in m.group(2).split(",")]
    return shapes


def resolve_shape(name: str, dims: list, given: dict[str, list[int]], batch: int) -> list[int]:
    """Concrete dims for an input: the user's, else the model's with a dynamic leading
    (batch) dimension set to `batch`. Raises OptionError (on `input_shapes`) naming any other
    unknown dimension."""
    if name in given:
        if len(given[name]) != len(dims):
            raise OptionError(f"{{0}} gives input '{name}' {len(given[name])} dims, "
                              f"the model has {len(dims)}", "input_shapes")
        return given[name]
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif i == 0:
            out.append(batch)
        else:
            known = ",".join(str(x) if isinstance(x, int) and x > 0 else "?" for x in dims)
            raise OptionError(f"input '{name}' has unknown dimension {i} ({d!r}); give it with {{0}} {name}:{known}",
                              "input_shapes")
    return out


def random_feeds(sess: ort.InferenceSession, given: dict[str, list[int]] | None = None,
                 batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input: floats uniform in [0, 1), integers in [0, 10)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = resolve_shape(i.name, list(i.shape), given or {}, batch)
        dtype = ORT_TYPES.get(i.type)
        if dtype is None:
            raise GDWSError(f"input '{i.name}' has type {i.type}, which random inputs do not cover")
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.random(shape).astype(dtype)
        else:
            feeds[i.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def probe_shapes(model: onnx.ModelProto, names: list[str], given: dict[str, list[int]] | None = None,
                 threads: int | None = 1) -> dict[str, list[int]]:
    """Dims of the tensors `names` from one ONNX Runtime run of `model` on seeded random inputs
    at the `given` input shapes (other inputs: the model's dims with a dynamic batch of 1), for
    shapes that static shape inference cannot see. Raises GDWSError saying why it cannot run."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:  # fail on an unknown dimension before building a session
        if vi.name not in inits:
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in vi.type.tensor_type.shape.dim]
            resolve_shape(vi.name, dims, given or {}, 1)
    sess = make_session(with_outputs(model, names), threads)
    feeds = random_feeds(sess, given, batch=1)
    run = [n for n in names if n not in feeds]  # a graph input's dims are its feed's
    try:
        values = dict(zip(run, sess.run(run, feeds))) if run else {}
    except GDWSError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises several types for models it cannot run
        raise GDWSError(f"ONNX Runtime cannot run the model: {e}") from None
    return {n: list((feeds[n] if n in feeds else values[n]).shape) for n in names}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (those that are not graph inputs or
    outputs already), to read intermediate values from one ONNX Runtime run. `model` is not modified."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    skip = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    for name in dict.fromkeys(names):
        if name not in skip:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return probe


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """`x` (samples on axis 0) with its last sample repeated up to `size` samples, for an input with a
    fixed batch dimension (the extra rows' outputs are to be dropped); `x` itself when it has `size` or more."""
    k = len(x)
    return x if k >= size else np.concatenate([x, np.repeat(x[-1:], size - k, 0)])


def data_feeds(sess: ort.InferenceSession, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs from user data: arrays keyed by input name, or `x` for a single-input model."""
    inputs = sess.get_inputs()
    if len(inputs) == 1 and inputs[0].name not in arrays and "x" in arrays:
        arrays = {inputs[0].name: arrays["x"]}
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise OptionError(f"{{0}} has no array for input(s) {missing}; give 'x' or arrays named after inputs",
                          "data")
    return {i.name: np.asarray(arrays[i.name], dtype=ORT_TYPES.get(i.type, np.float32)) for i in inputs}


@dataclass
class OutputComparison:
    """How far one output of the optimized model is from the original's."""

    name: str
    max_abs: float
    mean_abs: float
    relative: float  # ||y' - y||_2 / ||y||_2
    top1_agreement: float | None  # for (batch, classes) outputs

    def to_dict(self) -> dict:
        return asdict(self)


def run_batches(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], fetch: list[str],
                batch_size: int = 64, extra: dict[str, np.ndarray] | None = None):
    """Yield {name: value} for `fetch` over the samples of `feeds` (data input name -> array, samples
    on axis 0), batch by batch; `extra` inputs (not batched) are fed as they are. A fixed batch
    dimension is honoured by padding the last batch with its last sample (dropped again); a
    fetched name that is a data input comes from the feed itself."""
    extra = extra or {}
    inputs = {i.name: i for i in sess.get_inputs() if i.name not in extra}
    missing = [k for k in inputs if k not in feeds]
    if missing:
        raise GDWSError(f"calibration data has no array for input(s) {missing}")
    sizes = {len(feeds[k]) for k in inputs}
    if len(sizes) != 1 or 0 in sizes:
        raise GDWSError("calibration data needs the same, non-zero number of samples for every input")
    n = sizes.pop()
    fixed = [i.shape[0] for i in inputs.values() if len(i.shape) and isinstance(i.shape[0], int) and i.shape[0] > 0]
    step = min(fixed) if fixed else batch_size
    run = [t for t in fetch if t not in inputs]
    for s in range(0, n, step):
        batch = {k: np.asarray(feeds[k][s:s + step], ORT_TYPES.get(i.type, np.float32)) for k, i in inputs.items()}
        k = len(next(iter(batch.values())))
        if fixed:
            batch = {key: pad_batch(v, step) for key, v in batch.items()}
        values = dict(zip(run, sess.run(run, {**batch, **extra}))) if run else {}
        values.update({t: batch[t] for t in fetch if t in batch})
        yield {t: v[:k] for t, v in values.items()}


def compare(name: str, ref: np.ndarray, new: np.ndarray) -> OutputComparison:
    ref64, new64 = np.asarray(ref, np.float64), np.asarray(new, np.float64)
    diff = np.abs(new64 - ref64)
    norm = float(np.linalg.norm(ref64))
    rel = float(np.linalg.norm(new64 - ref64)) / norm if norm > 0 else float(diff.max(initial=0.0))
    top1 = None
    if ref64.ndim == 2 and ref64.shape[1] > 1:
        top1 = float(np.mean(ref64.argmax(1) == new64.argmax(1)))
    return OutputComparison(name, float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0,
                            rel, top1)


def run_and_compare(original: ort.InferenceSession, optimized: ort.InferenceSession,
                    feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None = None
                    ) -> list[OutputComparison]:
    """Run both sessions on the same feeds and compare every output by name (`reference`: the
    original's outputs on `feeds` when already computed)."""
    names = [o.name for o in original.get_outputs()]
    ref = [reference[n] for n in names] if reference is not None else original.run(names, feeds)
    new = optimized.run(names, feeds)
    return [compare(n, r, o) for n, r, o in zip(names, ref, new)]


INPUT_INSENSITIVE_RTOL = 1e-6  # an output "does not change" when it moves by less than this, relative


def input_insensitive_outputs(sess: ort.InferenceSession, feeds: dict[str, np.ndarray],
                              reference: dict[str, np.ndarray], seed: int = 1) -> list[str] | None:
    """Floating-point outputs that do not depend on the input: those that move by at most
    INPUT_INSENSITIVE_RTOL of their norm when every floating-point input in `feeds` is replaced by
    different, seeded uniform [0, 1) values of the same shape (`reference`: the outputs on `feeds`).
    Comparing such an output says nothing about the layers before it. None when the model has no
    floating-point input to vary; integer and bool outputs are not judged (they may agree by chance)."""
    rng = np.random.default_rng(seed)
    varied = {k: rng.random(v.shape).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
              for k, v in feeds.items()}
    if all(varied[k] is feeds[k] for k in feeds):
        return None
    names = [n for n, r in reference.items() if np.issubdtype(np.asarray(r).dtype, np.floating)]
    if not names:
        return []
    out = []
    for name, value in zip(names, sess.run(names, varied)):
        ref = np.asarray(reference[name], np.float64)
        moved = float(np.linalg.norm(np.asarray(value, np.float64) - ref))
        if moved <= INPUT_INSENSITIVE_RTOL * float(np.linalg.norm(ref)):
            out.append(name)
    return out
