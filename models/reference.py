"""Random-weight reference ONNX models for latency work, built with onnx.helper (no torch).

The graphs are what an eval-mode export with BatchNorm folded looks like: Conv (with bias),
Relu, Add, MaxPool, GlobalAveragePool/Flatten, Gemm. Weights are He-normal from a fixed
seed (residual branches scaled down so activations stay bounded); opset 17, dynamic batch,
input "input" (batch x 3 x H x W), output "logits". Not committed: build them when needed.

    python -m models.reference resnet50 -o out/resnet50.onnx
    python -m models.reference --list

Names: resnet18_cifar (1x3x32x32, 10 classes), vgg16_cifar (1x3x32x32, 10 classes),
resnet50 (1x3x224x224, ImageNet-style, 1000 classes, about 25.5M parameters).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int | None = None,
             name: str | None = None, gain: float = 1.0, relu: bool = True) -> str:
        name = name or self._name("conv")
        pad = k // 2 if pad is None else pad
        std = gain * np.sqrt(2.0 / (cin * k * k))
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(std)
        b = self.rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01)
        out = f"{name}_out"
        self.nodes.append(helper.make_node(
            "Conv", [x, self.init(f"{name}.weight", w), self.init(f"{name}.bias", b)], [out], name=name,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, dilations=[1, 1], group=1))
        return self.relu(out) if relu else out

    def relu(self, x: str) -> str:
        name = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out"

    def add(self, a: str, b: str) -> str:
        name = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [f"{name}_out"], name=name))
        return f"{name}_out"

    def maxpool(self, x: str, k: int, stride: int, pad: int = 0) -> str:
        name = self._name("maxpool")
        self.nodes.append(helper.make_node("MaxPool", [x], [f"{name}_out"], name=name,
                                           kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        return f"{name}_out"

    def head(self, x: str, features: int, classes: int, pool: bool = True) -> str:
        if pool:
            self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"))
            x = "gap_out"
        self.nodes.append(helper.make_node("Flatten", [x], ["flat_out"], name="flatten", axis=1))
        w = self.rng.standard_normal((classes, features), dtype=np.float32) * np.float32(np.sqrt(1.0 / features))
        b = np.zeros(classes, dtype=np.float32)
        self.nodes.append(helper.make_node(
            "Gemm", ["flat_out", self.init("fc.weight", w), self.init("fc.bias", b)], ["logits"],
            name="fc", transB=1))
        return "logits"

    def model(self, name: str, hw: int, classes: int) -> onnx.ModelProto:
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, hw, hw])
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
        graph = helper.make_graph(self.nodes, name, [inp], [out], initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx-gdws models.reference")
        m.ir_version = IR_VERSION
        m.doc_string = f"random-weight reference {name} (BatchNorm folded), for latency work only"
        return m


def _basic_block(b: _Builder, x: str, cin: int, cout: int, stride: int, prefix: str) -> str:
    h = b.conv(x, cin, cout, 3, stride, name=f"{prefix}.conv1")
    h = b.conv(h, cout, cout, 3, 1, name=f"{prefix}.conv2", gain=0.3, relu=False)
    sc = x if stride == 1 and cin == cout else b.conv(x, cin, cout, 1, stride, 0, name=f"{prefix}.shortcut", relu=False)
    return b.relu(b.add(h, sc))


def _bottleneck(b: _Builder, x: str, cin: int, width: int, stride: int, prefix: str) -> str:
    cout = 4 * width
    h = b.conv(x, cin, width, 1, 1, 0, name=f"{prefix}.conv1")
    h = b.conv(h, width, width, 3, stride, name=f"{prefix}.conv2")  # torchvision v1.5: stride on the 3x3
    h = b.conv(h, width, cout, 1, 1, 0, name=f"{prefix}.conv3", gain=0.3, relu=False)
    sc = x if stride == 1 and cin == cout else b.conv(x, cin, cout, 1, stride, 0, name=f"{prefix}.downsample", relu=False)
    return b.relu(b.add(h, sc))


def resnet18_cifar(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """CIFAR ResNet-18 (3x3 stem, BasicBlocks [2,2,2,2], widths 64-512), 3x32x32."""
    b = _Builder(seed)
    x = b.conv("input", 3, 64, 3, name="conv1")
    cin = 64
    for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
        for j in range(2):
            x = _basic_block(b, x, cin, cout, stride if j == 0 else 1, f"layer{i + 1}.{j}")
            cin = cout
    b.head(x, 512, classes)
    return b.model("resnet18_cifar", 32, classes)


def vgg16_cifar(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """CIFAR VGG-16 (13 3x3 convs 64-512, 5 max pools, linear 512 -> classes), 3x32x32."""
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
    b = _Builder(seed)
    x, cin, i = "input", 3, 0
    for v in cfg:
        if v == "M":
            x = b.maxpool(x, 2, 2)
        else:
            x = b.conv(x, cin, int(v), 3, name=f"features.{i}")
            cin, i = int(v), i + 1
    b.head(x, 512, classes, pool=False)
    return b.model("vgg16_cifar", 32, classes)


def resnet50(seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """ImageNet ResNet-50 (torchvision v1.5 layout, BN folded), 3x224x224, about 25.5M params."""
    b = _Builder(seed)
    x = b.conv("input", 3, 64, 7, 2, 3, name="conv1")
    x = b.maxpool(x, 3, 2, 1)
    cin = 64
    for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
        for j in range(blocks):
            x = _bottleneck(b, x, cin, width, stride if j == 0 else 1, f"layer{i + 1}.{j}")
            cin = 4 * width
    b.head(x, 2048, classes)
    return b.model("resnet50", 224, classes)


BUILDERS = {"resnet18_cifar": resnet18_cifar, "vgg16_cifar": vgg16_cifar, "resnet50": resnet50}
ALIASES = {"resnet18": "resnet18_cifar", "vgg16": "vgg16_cifar", "resnet50_imagenet": "resnet50"}
# parameters (conv weights + folded biases + classifier), checked by tests/test_models.py
PARAM_COUNTS = {"resnet18_cifar": 11_169_162, "vgg16_cifar": 14_719_818, "resnet50": 25_530_472}


def build_reference(name: str, seed: int = 0) -> onnx.ModelProto:
    """Build a reference model by name (see BUILDERS / ALIASES)."""
    key = ALIASES.get(name, name)
    if key not in BUILDERS:
        raise ValueError(f"unknown reference model {name!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[key](seed=seed)


def param_count(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help=f"one of {sorted(BUILDERS)}")
    p.add_argument("-o", "--output", help="ONNX file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the reference models")
    a = p.parse_args(argv)
    if a.list or not a.name:
        for k in sorted(BUILDERS):
            print(f"{k}\t{PARAM_COUNTS[k]:,} params")
        return 0
    m = build_reference(a.name, a.seed)
    out = a.output or f"{ALIASES.get(a.name, a.name)}.onnx"
    onnx.save(m, out)
    print(f"{out}: {param_count(m):,} parameters, {len(m.graph.node)} nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
