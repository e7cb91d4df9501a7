"""The torch gradient source: autograd through `TorchReplica`, numpy in and out."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import onnx

from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.gradients.qdq import dequantized_surrogate
from gdws_onnx.eval.gradients.torch_replica import TorchReplica


class TorchSource:
    """Gradients from `TorchReplica` by torch autograd (float32 unless dtype says otherwise).

    On a model with activation QuantizeLinear nodes (QDQ int8) the gradients are straight-through
    estimates (BPDA): `bpda` is True, `name` is "torch-bpda", and `surrogate` is the float graph
    whose gradient they approximate (see `qdq.DequantizedSurrogate`). GDWSError when torch is not
    installed or the replica does not support the model. `threads`: torch's intra-op threads
    while this source computes (torch's own setting is restored after each call)."""

    name = "torch"

    def __init__(self, model: onnx.ModelProto, batch_size: int = 64, dtype: str = "float32",
                 fuse_gdws: bool = True, threads: int | None = None):
        try:
            import torch
        except ImportError:
            raise GDWSError("gradient source torch needs torch (pip install torch==2.13.0, CPU wheel)") from None
        self.torch = torch
        self.replica = TorchReplica(model, dtype=dtype, fuse_gdws=fuse_gdws)
        self.batch = batch_size
        self.bpda = self.replica.bpda
        self.name = "torch-bpda" if self.bpda else "torch"
        self._model = model
        self._surrogate = None
        self.threads = threads

    @contextmanager
    def _threads(self):
        """torch runs on `threads` intra-op threads inside the block, as before it after."""
        if self.threads is None:
            yield
            return
        old = self.torch.get_num_threads()
        self.torch.set_num_threads(max(1, self.threads))
        try:
            yield
        finally:
            self.torch.set_num_threads(old)

    @property
    def surrogate(self) -> onnx.ModelProto:
        """The dequantized float surrogate of a BPDA model (built on first use)."""
        if self._surrogate is None:
            self._surrogate = dequantized_surrogate(self._model)
        return self._surrogate

    def _x(self, x: np.ndarray, grad: bool):
        t = self.torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.replica.dtype)
        return t.requires_grad_(grad)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits of the replica, without autograd."""
        with self._threads(), self.torch.no_grad():
            return np.concatenate([self.replica(self._x(x[s:s + self.batch], False)).float().numpy()
                                   for s in range(0, len(x), self.batch)])

    def vjp(self, x: np.ndarray, adj: np.ndarray) -> np.ndarray:
        """adj^T d logits / d x by autograd."""
        out = []
        with self._threads():
            for s in range(0, len(x), self.batch):
                with self.torch.enable_grad():  # also when called from a torch backward (ort_module)
                    xt = self._x(x[s:s + self.batch], True)
                    z = self.replica(xt)
                (g,) = self.torch.autograd.grad(z, xt, self.torch.from_numpy(
                    np.ascontiguousarray(adj[s:s + self.batch])).to(z.dtype))
                out.append(g.float().numpy())
        return np.concatenate(out)

    def ce_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, d sum_i CE / d x) by autograd."""
        F = self.torch.nn.functional
        logits, grads = [], []
        with self._threads():
            for s in range(0, len(x), self.batch):
                with self.torch.enable_grad():
                    xt = self._x(x[s:s + self.batch], True)
                    z = self.replica(xt)
                    loss = F.cross_entropy(z, self.torch.from_numpy(y[s:s + self.batch]), reduction="sum")
                (g,) = self.torch.autograd.grad(loss, xt)
                logits.append(z.detach().float().numpy())
                grads.append(g.float().numpy())
        return np.concatenate(logits), np.concatenate(grads)
