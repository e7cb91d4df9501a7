"""ONNX Runtime as the classifier every attack decision is taken on, and its bridge into torch."""

from __future__ import annotations

import time

import numpy as np
import onnx

from gdws_onnx.eval.gradients.prepare import input_shape, logits_model
from gdws_onnx.eval.gradients.protocol import GradientSource
from gdws_onnx.runtime.session import make_session, pad_batch


class OrtClassifier:
    """ONNX Runtime forward passes of a single-input classifier, in batches (logits out).

    A terminal Softmax is cut off (`softmax_cut`); a model with a fixed batch dimension gets
    chunks padded to it. `calls` and `seconds` count the session runs and the time inside them."""

    def __init__(self, model: onnx.ModelProto, batch_size: int = 256, threads: int | None = None):
        self.model, self.softmax_cut = logits_model(model)
        self.session = make_session(self.model, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        dims, _ = input_shape(self.model)
        self.fixed_batch = dims[0] if dims and isinstance(dims[0], int) else None
        self.batch_size = self.fixed_batch or batch_size
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        t0 = time.perf_counter()
        outs = []
        for s in range(0, x.shape[0], self.batch_size):
            chunk = x[s:s + self.batch_size]
            k = chunk.shape[0]
            if self.fixed_batch:
                chunk = pad_batch(chunk, self.fixed_batch)
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:k])
            self.calls += 1
        self.seconds += time.perf_counter() - t0
        return np.concatenate(outs).astype(np.float32, copy=False) if outs else np.zeros((0,), np.float32)


def ort_module(ort_model: OrtClassifier, source: GradientSource, n_params: int = 1):
    """A torch.nn.Module whose forward is ONNX Runtime and whose backward is `source.vjp`,
    so a torch attack library takes every decision on exact ORT outputs."""
    import torch

    class _OrtFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            xn = x.detach().cpu().numpy()
            ctx.save_for_backward(x)
            return torch.from_numpy(ort_model(xn).copy()).to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return torch.from_numpy(source.vjp(x.detach().cpu().numpy(),
                                               g.detach().cpu().numpy().astype(np.float32))).to(x.dtype)

    class OrtModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._anchor = torch.nn.Parameter(torch.zeros(n_params), requires_grad=False)

        def forward(self, x):
            return _OrtFn.apply(x)

    return OrtModule().eval()
