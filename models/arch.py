"""PyTorch architectures of the model zoo.

All models take [0, 1] pixels and normalize inside (so an L-inf eps is in pixel space and
the normalization is part of the exported ONNX graph); all output logits.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std per channel, exported as Sub/Div with constant tensors."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGSmall(nn.Module):
    """VGG-style net for Fashion-MNIST (1x28x28): 7 plain 3x3 convs (BN+ReLU).

    32-32 | pool 14 | 64-64 | pool 7 | 128-128-128 | pool 3 | FC 1152-256-10.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 mean: tuple[float, ...] = FMNIST_MEAN, std: tuple[float, ...] = FMNIST_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, 32), *conv_bn_relu(32, 32), nn.MaxPool2d(2),
            *conv_bn_relu(32, 64), *conv_bn_relu(64, 64), nn.MaxPool2d(2),
            *conv_bn_relu(64, 128), *conv_bn_relu(128, 128), *conv_bn_relu(128, 128), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, BasicBlocks [2, 2, 2, 2], global average pool)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64,
                 mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers = []
        cin = width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


class ResNet18Small(ResNet18):
    """ResNet-18 for Fashion-MNIST (1x28x28) with base width 16 (16-32-64-128)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__(in_channels=1, num_classes=num_classes, width=width, mean=FMNIST_MEAN, std=FMNIST_STD)


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """Full-width VGG-16 (13 convs with BN) for 3x32x32 inputs, linear classifier on 512 features."""

    def __init__(self, num_classes: int = 10, mean: tuple[float, ...] = CIFAR_MEAN,
                 std: tuple[float, ...] = CIFAR_STD, in_channels: int = 3, first_padding: int = 1):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        cin = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn_relu(cin, int(v))
                if cin == in_channels and first_padding != 1:
                    layers[-3].padding = (first_padding, first_padding)
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class VGG16FashionMNIST(VGG16):
    """Paper-width VGG-16 (64-512) for Fashion-MNIST (1x28x28).

    The first conv pads by 3 instead of 1, so its output is 32x32 and the five stages see
    32, 16, 8, 4 and 2 pixel maps, as CIFAR's VGG-16 does (the deepest 512-wide convs on 2x2).
    Padding inside the conv keeps the graph free of Pad nodes (and of the shape subgraphs that
    torch's F.pad exports).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes=num_classes, mean=FMNIST_MEAN, std=FMNIST_STD, in_channels=1, first_padding=3)


ARCHS = {
    "vgg_small": (VGGSmall, (1, 28, 28)),
    "resnet18_small": (ResNet18Small, (1, 28, 28)),
    "vgg16": (VGG16, (3, 32, 32)),
    "vgg16_fmnist": (VGG16FashionMNIST, (1, 28, 28)),
    "resnet18": (ResNet18, (3, 32, 32)),
}


def build(arch: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """Instantiate an architecture by name; returns (model, input shape C x H x W)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
    cls, shape = ARCHS[arch]
    return cls(), shape
