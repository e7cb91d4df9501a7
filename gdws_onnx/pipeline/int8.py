"""The INT8 step of `optimize` and INT8 latency: ORT static QDQ quantization of the rewritten
model (peers.quantize) calibrated on `--data`, with where its convs stand, and `QuantizedProbe`,
through which the latency planner compares the INT8 forms of what it would otherwise time in float.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.qdq import int8_coverage
from gdws_onnx.pipeline.inputs import data_arrays, named_inputs
from gdws_onnx.pipeline.measure import layer_probes
from gdws_onnx.pipeline.mixed_precision import mixed_precision
from gdws_onnx.pipeline.options import RunOptions, TimingOptions
from gdws_onnx.pipeline.report import MixedPrecisionReport, QuantizeSummary
from gdws_onnx.runtime.bench import Ratio
from gdws_onnx.runtime.kernels import conv_kernels

QUANTIZE_SAMPLES = 256  # samples of the data the INT8 step calibrates on (the first ones)
# uint8 activations (U8S8): ORT's x86 CPU EP runs QLinearConv on uint8 data only and turns an int8
# Q -> DQ pair into uint8 only where the Q has a single consumer; with int8 activations the convs
# next to a branching activation stay float (measured: peers.quantize)
QUANTIZE_ACTIVATIONS = "uint8"
QUANTIZE_PLACEMENT = ("ORT's QDQ placement (every Conv, and each GDWS Gather, between DequantizeLinear and "
                      "QuantizeLinear), with uint8 activations so that no int8 pair is left unconverted for "
                      "the CPU EP's QLinearConv")


def require_quantizable(model: onnx.ModelProto) -> None:
    """GDWSError when the INT8 step could not quantize this model (peers.quantize.quantizable)."""
    from gdws_onnx.peers.quantize import quantizable

    problem = quantizable(model, per_channel=True)
    if problem:
        raise GDWSError(problem)


def quantize(model: onnx.ModelProto, run: RunOptions, timing: TimingOptions | None = None
             ) -> tuple[onnx.ModelProto, QuantizeSummary]:
    """The rewritten model as INT8 (peers.quantize: ORT static QDQ, per-channel int8 weights,
    QUANTIZE_ACTIVATIONS activations, MinMax) calibrated on the first QUANTIZE_SAMPLES samples of
    `run.data`; with where its convs stand: QDQ-wrapped in the graph (graph.qdq.int8_coverage) and
    the kernel ORT's CPU EP runs each as (runtime.kernels.conv_kernels). Given `timing` (on the CPU
    EP), convs whose INT8 kernel is slower are left float where the whole model then measures
    faster (pipeline.mixed_precision). Returns a new model."""
    from gdws_onnx.peers.quantize import QuantizeInt8Pass, calibration_set

    x, desc = calibration_inputs(model, run)
    x = calibration_set(model, x, QUANTIZE_SAMPLES)

    def int8(float_convs: tuple[str, ...] = ()):
        return QuantizeInt8Pass(x, per_channel=True, samples=len(x), activation_type=QUANTIZE_ACTIVATIONS,
                                exclude=float_convs).call(model)

    result = int8()
    quantized, mixed = result.model, None
    if timing is not None:
        quantized, mixed = mixed_step(model, quantized, lambda names: int8(tuple(names)).model, timing, run)
    ran = conv_kernels(quantized, run.threads)
    kernels = {k.name: k for k in ran.convs}
    convs = [{"name": c.name, "layer": c.layer, "role": c.role, "wrapped": c.wrapped, "missing": c.missing,
              "kernel": kernels[c.name].op_type, "int8": kernels[c.name].int8}
             for c in int8_coverage(quantized).convs]
    method = result.report.message + (f"; {len(mixed.float_convs)} conv(s) left float (measured faster)"
                                       if mixed is not None and mixed.float_convs else "")
    return quantized, QuantizeSummary(scheme="int8", method=method, calibration=desc, samples=len(x),
                                      placement=QUANTIZE_PLACEMENT, convs=convs, op_counts=ran.op_counts,
                                      mixed_precision=mixed)


def mixed_step(model: onnx.ModelProto, all_int8: onnx.ModelProto, with_float: Callable[[list[str]], onnx.ModelProto],
               timing: TimingOptions, run: RunOptions) -> tuple[onnx.ModelProto, MixedPrecisionReport]:
    """pipeline.mixed_precision on `timing`'s model probes; on another EP than the CPU it is not
    run (the screen profiles ORT's CPU kernels), and says so."""
    if timing.ep != "cpu":
        return all_int8, MixedPrecisionReport(message=f"mixed precision not searched: it profiles ORT's CPU "
                                                      f"kernels, and the EP is {timing.ep}")
    return mixed_precision(model, all_int8, with_float, layer_probes(timing, run, "model"), run.threads)


def calibration_inputs(model: onnx.ModelProto, run: RunOptions) -> tuple[np.ndarray, str]:
    """The INT8 calibration samples: the first QUANTIZE_SAMPLES of `run.data` for the model's one
    input, and their description."""
    arrays, desc = data_arrays(run.data, QUANTIZE_SAMPLES)
    return next(iter(named_inputs(model, arrays).values())), desc


def quantize_for_timing(model: onnx.ModelProto, calibration: np.ndarray | None) -> onnx.ModelProto:
    """The model as the INT8 step would quantize it. Without calibration samples (a one-layer
    model) it calibrates on uniform random inputs of its static input shape: ORT's int8 kernels
    take the same time whatever the scales, so the timing does not depend on them."""
    from gdws_onnx.peers.quantize import QuantizeInt8Pass, calibration_set, fixed_batch

    if calibration is None:
        inp = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        calibration = np.random.default_rng(0).random((fixed_batch(inp) or 8, *dims[1:]), dtype=np.float32)
    x = calibration_set(model, calibration, QUANTIZE_SAMPLES)
    return QuantizeInt8Pass(x, per_channel=True, samples=len(x), activation_type=QUANTIZE_ACTIVATIONS).call(model).model


@dataclass
class QuantizedProbe:
    """A latency probe (pipeline.measure.Probe) that times the INT8 forms of the two models it is
    given: a layer's GDWS form against the layer, or a GDWS model against the original, both
    quantized (so the whole-model baseline is INT8 alone). Each distinct model is quantized once."""

    probe: object  # pipeline.measure.Probe
    calibration: np.ndarray | None = None  # whole models: the INT8 step's samples; None: layer models
    quantized: dict[str, onnx.ModelProto] = field(default_factory=dict)

    def int8(self, model: onnx.ModelProto) -> onnx.ModelProto:
        key = hashlib.sha256(model.SerializeToString()).hexdigest()
        if key not in self.quantized:
            self.quantized[key] = quantize_for_timing(model, self.calibration)
        return self.quantized[key]

    def compare(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto,
                threshold: float | tuple[float, ...] | None = None) -> Ratio:
        return self.probe.compare(self.int8(baseline), self.int8(candidate), threshold)
