"""ONNX Runtime static INT8 quantization (QDQ, per-channel weights, MinMax calibration)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import helper

from gdws_onnx.errors import GDWSError, OptionError
from gdws_onnx.graph.passes import PassResult
from gdws_onnx.peers.common import PeerReport

CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise GDWSError(f"INT8 calibration needs a model with one input, this one has {len(inputs)}")
    return inputs[0]


def _io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def calibration_batches(x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Consecutive float32 slices of at most `batch` samples."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return [x[i:i + batch] for i in range(0, len(x), batch)]


def _reader(name: str, batches: list[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class _ArrayReader(CalibrationDataReader):
        """Feeds {input name: batch} once per batch, then None."""

        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {name: x}

        def rewind(self):
            self._it = iter(batches)

    return _ArrayReader()


def restore_ir_version(model: onnx.ModelProto, original_ir: int) -> None:
    """Lower an IR version the writer raised back to the original's (or to the least the
    model's opsets need): ORT rejects IR versions newer than it knows (onnx 1.23 writes IR 12+)."""
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    target = max(original_ir, needed)
    if model.ir_version > target:
        model.ir_version = target


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Hold back warnings on the root logger for the duration (ORT's quantizer logs its advice to
    run pre-processing there, once per call); the level is restored after."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def restore_model_info(quantized: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Give the quantized model the original's producer, version, domain, doc string and metadata
    (ORT's quantizer writes its own producer and adds a metadata entry)."""
    quantized.producer_name, quantized.producer_version = original.producer_name, original.producer_version
    quantized.domain, quantized.model_version, quantized.doc_string = original.domain, original.model_version, \
        original.doc_string
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(original.metadata_props)


def quantizable(model: onnx.ModelProto, per_channel: bool = True) -> str | None:
    """Why ORT's static quantization cannot quantize this model as asked (None: it can): one
    graph input is needed (to calibrate), and per-channel weights need default-domain opset >= 13
    (DequantizeLinear's `axis`; ORT's quantizer writes it anyway, giving an invalid model)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return f"INT8 calibration needs a model with one input, this one has {len(inputs)}"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if per_channel and opset < 13:
        return (f"per-channel INT8 needs opset >= 13 (DequantizeLinear with an axis); the model has opset {opset}: "
                "convert it first (onnx.version_converter.convert_version(model, 13))")
    return None


def fixed_batch(inp: onnx.ValueInfoProto) -> int:
    """The input's fixed leading (batch) dimension, 0 when it is dynamic or absent."""
    dims = inp.type.tensor_type.shape.dim
    return dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else 0


def calibration_set(model: onnx.ModelProto, calibration: np.ndarray, samples: int = CALIBRATION_SAMPLES) -> np.ndarray:
    """The calibration rows the quantizer uses: the first `samples`, cut to whole batches when the
    model's input has a fixed batch size. GDWSError when they do not fit the input."""
    inp = _graph_input(model)
    dims = inp.type.tensor_type.shape.dim
    x = np.asarray(calibration)[:samples]
    if x.ndim != len(dims) or len(x) == 0:
        raise GDWSError(f"calibration must be N x {len(dims) - 1} dims like input '{inp.name}', got shape {x.shape}")
    batch = fixed_batch(inp)
    if batch:  # a fixed batch dimension takes whole batches only
        x = x[:len(x) - len(x) % batch]
        if len(x) == 0:
            raise GDWSError(f"input '{inp.name}' has a fixed batch of {batch}: give at least that many "
                            "calibration samples")
    return x


class QuantizeInt8Pass:
    """ORT static INT8 quantization: QDQ format, int8 weights (per output channel by default),
    `activation_type` ("int8" or "uint8") activations, MinMax calibration on the first `samples`
    rows of `calibration` (N x C x H x W float32, as the model's input). `preprocess` runs ORT's
    quant_pre_process first. `exclude`: names of nodes left float (ORT's `nodes_to_exclude`: no
    QDQ around them; the tensors they share with quantized nodes are still quantized there).

    Not in place (`in_place` is False): `call(model)` leaves the model it is given as it is and
    returns the quantized one, with the same graph input/output names and IR version; its
    report is a PeerReport without layers (the conv structure, and so the conv MACs, are the
    float model's: label them so, as `find_convs` cannot fold the DequantizeLinear weights, the
    onnx reference evaluator lacking DequantizeLinear-17).

    Activations default to int8 (S8S8, ORT's recommended QDQ default): on the shipped VGG with
    ORT 1.32's CPU EP (AVX512-VNNI) int8 and uint8 activations, with or without preprocessing,
    ran within 3 % of each other at batch 1 and 32, with the same accuracy. But the x86 CPU EP
    runs QLinearConv on uint8 activations only: it converts an int8 Q -> DQ pair to uint8 only
    where the Q has one consumer, so where an activation branches (a residual block's input)
    the convs beside it stay float (ResNet-18-small: 8 of 20 convs as QLinearConv with int8
    activations, 20 of 20 with uint8, same top-1). `optimize(quantize="int8")` asks for uint8;
    `graph.qdq.int8_coverage` and `runtime.kernels.conv_kernels` say where the convs stand.
    """

    in_place = False

    def __init__(self, calibration: np.ndarray, per_channel: bool = True, samples: int = CALIBRATION_SAMPLES,
                 activation_type: str = "int8", preprocess: bool = False, exclude: tuple[str, ...] = ()):
        if activation_type not in ("uint8", "int8"):
            raise OptionError(f"{{0}} must be 'uint8' or 'int8', got {activation_type!r}", "activation_type")
        self.calibration = calibration
        self.per_channel = per_channel
        self.samples = samples
        self.activation_type = activation_type
        self.preprocess = preprocess
        self.exclude = tuple(exclude)

    def call(self, model: onnx.ModelProto) -> PassResult:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        acts = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        problem = quantizable(model, self.per_channel)
        if problem:
            raise GDWSError(problem)
        inp = _graph_input(model)
        x = calibration_set(model, self.calibration, self.samples)
        batch = fixed_batch(inp) or CALIBRATION_BATCH
        batches = calibration_batches(x, batch)
        original_ir = model.ir_version
        io_names = _io_names(model)
        with tempfile.TemporaryDirectory(prefix="gdws-int8-") as tmp:
            src, out = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
            onnx.save_model(model, src)
            if self.preprocess:
                from onnxruntime.quantization.shape_inference import quant_pre_process

                pre = os.path.join(tmp, "pre.onnx")
                quant_pre_process(src, pre)
                src = pre
            with quiet_root_logger():
                quantize_static(src, out, _reader(inp.name, batches), quant_format=QuantFormat.QDQ,
                                per_channel=self.per_channel, activation_type=acts[self.activation_type],
                                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                                nodes_to_exclude=list(self.exclude))
            quantized = onnx.load_model(out)
        restore_ir_version(quantized, original_ir)
        restore_model_info(quantized, model)
        if _io_names(quantized) != io_names:
            raise GDWSError("INT8 quantization changed the model's input/output names")
        message = (f"QDQ, {'per-channel' if self.per_channel else 'per-tensor'} int8 weights, "
                   f"{self.activation_type} activations, MinMax on {len(x)} calibration samples"
                   + (f"; {len(self.exclude)} node(s) left float" if self.exclude else ""))
        return PassResult(quantized, True, PeerReport(method="quantize_int8", message=message))
