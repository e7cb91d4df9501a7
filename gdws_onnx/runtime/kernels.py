"""Which kernels ONNX Runtime runs a model's convs as, read from the graph it optimized.

A session created with `optimized_model_filepath` writes the graph after all its optimizations
(QDQ fusion to QLinearConv, the NCHWc/NHWC layout transformers, Conv+activation fusion): reading
that graph's op types is cheaper than profiling and does not depend on timing. Each Conv of the
model is found in it by its weight or bias (behind a DequantizeLinear: the int8 tensor it reads,
which the fused kernel reads directly), else by name (ORT names a fused node after the node or
the output it replaces, with a suffix such as `_token_12` or `_nchwc`: `bench.FUSED_SUFFIXES`).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx
import onnxruntime as ort

from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.convs import node_label
from gdws_onnx.runtime.bench import FUSED_SUFFIXES, BenchConfig, profile_nodes
from gdws_onnx.runtime.session import session_options

INT8_CONV_OPS = ("QLinearConv", "ConvInteger")  # int8 conv kernels of ORT (any domain)
WEIGHTS_INLINE_BYTES = 1024  # initializers above this stay out of the written graph: only op types are read


@dataclass
class ConvKernel:
    """What ORT runs one Conv of the model as."""

    name: str  # node_label of the Conv in the model given
    op_type: str  # the optimized graph's node: "QLinearConv", "Conv", "FusedConv", ... ("" when not found)
    domain: str = ""
    node: str = ""  # its name in the optimized graph

    @property
    def int8(self) -> bool:
        return self.op_type in INT8_CONV_OPS


@dataclass
class KernelReport:
    """The kernel of every Conv of a model in ORT's optimized graph, and that graph's op counts."""

    convs: list[ConvKernel]
    op_counts: dict[str, int] = field(default_factory=dict)  # op type -> nodes in the optimized graph
    level: str = "ORT_ENABLE_ALL"

    @property
    def int8(self) -> list[ConvKernel]:
        return [k for k in self.convs if k.int8]

    def to_dict(self) -> dict:
        return {"convs": [asdict(k) for k in self.convs], "op_counts": self.op_counts, "level": self.level}


def optimized_graph(model: onnx.ModelProto | str, threads: int | None = 1) -> onnx.ModelProto:
    """The graph ORT's CPU EP runs, after ORT_ENABLE_ALL optimizations, without its large
    initializers (they go to a scratch file that is discarded)."""
    so = session_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = model if isinstance(model, str) else model.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="gdws-kernels-") as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(WEIGHTS_INLINE_BYTES))
        try:
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises several types for unloadable models
            raise GDWSError(f"ONNX Runtime cannot load the model: {e}") from None
        return onnx.load_model(so.optimized_model_filepath, load_external_data=False)


def _base_name(name: str) -> str:
    for suffix in FUSED_SUFFIXES:
        name = name.split(suffix)[0]
    return name


def _conv_keys(model: onnx.ModelProto, conv: onnx.NodeProto) -> list[str]:
    """What finds a Conv of `model` in ORT's optimized graph, surest first: its constant inputs
    (weight, bias; behind a DequantizeLinear, the int8 tensors it reads), then the names ORT gives a
    node fused from it (its name, its output, the output of a Relu/Clip it feeds alone)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = [n for n in model.graph.node if conv.output[0] in n.input]
    keys = []
    for name in conv.input[1:]:
        p = producer.get(name)
        keys.append(p.input[0] if p is not None and p.op_type == "DequantizeLinear" else name)
    keys += [conv.name, conv.output[0]]
    if len(consumers) == 1 and consumers[0].op_type in ("Relu", "Clip"):
        keys.append(consumers[0].output[0])
    return [k for k in keys if k]


def conv_kernels(model: onnx.ModelProto, threads: int | None = 1) -> KernelReport:
    """For each Conv of `model` (graph order), the op type of the node ORT runs in its place."""
    optimized = optimized_graph(model, threads)
    index: dict[str, onnx.NodeProto] = {}
    for n in optimized.graph.node:
        if "Conv" in n.op_type:
            for key in (*n.input[1:], _base_name(n.name)):
                index.setdefault(key, n)
    kernels = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        found = next((index[k] for k in _conv_keys(model, conv) if k in index), None)
        kernels.append(ConvKernel(node_label(conv), found.op_type, found.domain, found.name) if found is not None
                       else ConvKernel(node_label(conv), ""))
    return KernelReport(kernels, dict(sorted(Counter(n.op_type for n in optimized.graph.node).items())))


def conv_kernel_times(model: onnx.ModelProto, config: BenchConfig) -> dict[str, tuple[str, float]]:
    """For each Conv of `model` that ORT's CPU EP runs as a node of its own: (that node's op type,
    its median kernel time in microseconds over `config.runs` profiled runs). A Conv fused with
    its activation is timed with it; a Conv not found in the optimized graph is left out."""
    times = profile_nodes(model, config)
    return {k.name: (k.op_type, times[k.node]) for k in conv_kernels(model, config.threads).convs
            if k.node and k.node in times}
