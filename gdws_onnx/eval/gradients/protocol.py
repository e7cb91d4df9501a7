"""The interface every gradient source implements, and the loss its `ce_grad` differentiates."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class GradientSource(Protocol):
    """Logits and input gradients of one classifier, numpy in and out (float32)."""

    name: str

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits as this source computes them."""

    def vjp(self, x: np.ndarray, adj: np.ndarray) -> np.ndarray:
        """adj^T d logits / d x, shaped like x."""

    def ce_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, d sum_i CE(logits_i, y_i) / d x)."""


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (N, classes) in float64."""
    z = z.astype(np.float64) - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy in float64."""
    z = logits.astype(np.float64)
    m = z.max(1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
    return lse - z[np.arange(len(y)), y]
