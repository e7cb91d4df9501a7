"""Mixed precision for the INT8 step: keep float the convs whose INT8 kernel ONNX Runtime runs
slower than their float kernel, where the whole model then measures faster.

ORT's x86 INT8 conv (QLinearConv) is not faster everywhere. A conv with one input channel (the
first conv of a grey-scale classifier: a reduction of C * kh * kw = 9 over many pixels) runs
several times slower in INT8 than in float: 108-149 us against 18-36 us for the first conv of the
shipped VGG-16 after spatial SVD, a fifth of the whole INT8 model (docs/results.md). Leaving such
a conv float costs a QuantizeLinear after it (and layout reorders), so the choice is
made on the whole model, by measurement:

1. Screen: ORT's profiler times each conv's kernel in the float model and in its all-INT8 form
   (`runtime.kernels.conv_kernel_times`, one batch). Convs whose INT8 kernel took longer are the
   candidates, the largest loss first. The profile is not interleaved: it only orders candidates.
2. Decide: candidates are added one at a time; an addition is kept only when the model
   re-quantized with those convs float measures faster than the best model so far at every batch
   (interleaved, the interval of the median ratio below 1: `measure.faster`). The first candidate
   not kept ends the search, as every later one lost less in the screen.
3. Grow: after a conv is kept float, the conv that reads its output (through activations) is
   tried next, though its own INT8 kernel may be faster: the float-to-INT8 boundary costs a
   QuantizeLinear, layout reorders and a Transpose over the tensor it crosses, and one conv later
   that tensor may be smaller (the VGG-16's second conv, spatial SVD at rank 16: 64 -> 16
   channels). A grown conv that does not pay ends only the growth.

The result is never slower than the all-INT8 model by this measure: with no candidate kept it is
that model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import onnx

from gdws_onnx.graph.convs import node_label
from gdws_onnx.pipeline.measure import Probe, faster
from gdws_onnx.pipeline.report import ConvKernelTimes, MixedPrecisionReport, MixedStep
from gdws_onnx.runtime.bench import BenchConfig
from gdws_onnx.runtime.kernels import INT8_CONV_OPS, conv_kernel_times

SCREEN_RUNS = 50  # profiled runs per model in the screen (after SCREEN_WARMUP)
SCREEN_WARMUP = 10
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh")  # next_conv passes these


def screen(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, batch: int,
           threads: int | None) -> list[ConvKernelTimes]:
    """Every conv found in both models' ORT profiles at `batch`, with its float and INT8 kernel time."""
    config = BenchConfig(ep="cpu", batch=batch, threads=threads, runs=SCREEN_RUNS, warmup=SCREEN_WARMUP)
    fp, q8 = conv_kernel_times(float_model, config), conv_kernel_times(int8_model, config)
    return [ConvKernelTimes(name, fp[name][1], q8[name][1]) for name in fp
            if name in q8 and q8[name][0] in INT8_CONV_OPS]


def next_conv(model: onnx.ModelProto, name: str) -> str | None:
    """The conv that reads conv `name`'s output, directly or through elementwise activations each
    read by one node only (None when the output branches or meets another op first)."""
    nodes = {node_label(n): n for n in model.graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = nodes[name].output[0] if name in nodes else ""
    while len(consumers.get(out, [])) == 1:
        reader = consumers[out][0]
        if reader.op_type == "Conv" and reader.input[0] == out:
            return node_label(reader)
        if reader.op_type not in ACTIVATIONS:
            return None
        out = reader.output[0]
    return None


def choose_float_convs(all_int8: onnx.ModelProto, candidates: list[str],
                       with_float: Callable[[list[str]], onnx.ModelProto], probes: dict[int, Probe],
                       following: Callable[[str], str | None] = lambda name: None
                       ) -> tuple[onnx.ModelProto, list[str], list[MixedStep]]:
    """The greedy decision (module doc, step 2): returns the chosen model, the convs it leaves
    float and every measurement. `with_float(names)` quantizes the model with those convs float;
    `following(name)` is the conv after a kept one, tried next (`next_conv`)."""
    best, kept, steps = all_int8, [], []
    queue = [(name, "") for name in candidates]
    tried: set[str] = set()
    while queue:
        name, after = queue.pop(0)
        if name in tried:
            continue
        tried.add(name)
        trial = with_float([*kept, name])
        ratios = {b: p.compare(best, trial, threshold=1.0) for b, p in probes.items()}
        ok = all(faster(r, 1.0) for r in ratios.values())
        steps.append(MixedStep([*kept, name], {b: asdict(r) for b, r in ratios.items()}, ok, after))
        if ok:
            best, kept = trial, [*kept, name]
            nxt = following(name)
            if nxt is not None:
                queue.insert(0, (nxt, name))
        elif not after:  # a screened candidate that did not pay ends the search
            break
    return best, kept, steps


def mixed_precision(float_model: onnx.ModelProto, all_int8: onnx.ModelProto,
                    with_float: Callable[[list[str]], onnx.ModelProto], probes: dict[int, Probe],
                    threads: int | None) -> tuple[onnx.ModelProto, MixedPrecisionReport]:
    """Screen, then decide (module doc); the chosen model and what was measured."""
    batch = min(probes)
    report = MixedPrecisionReport(screened=screen(float_model, all_int8, batch, threads), screen_batch=batch)
    model, report.float_convs, report.steps = choose_float_convs(
        all_int8, [t.name for t in report.candidates], with_float, probes,
        following=lambda name: next_conv(float_model, name))
    return model, report
