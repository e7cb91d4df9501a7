"""The onnx-ad gradient source: reverse-mode graphs of `onnx_ad.reverse`, run in ONNX Runtime.

onnx-ad needs static shapes, so the model's batch is fixed and batches are padded/chunked to it.
onnx_ad is imported when a source is built, never at import time."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper

from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.gradients.prepare import input_shape, logits_model, single_io, with_batch
from gdws_onnx.eval.gradients.qdq import activation_quantizers
from gdws_onnx.runtime.session import make_session


class OnnxADSource:
    """Reverse-mode ONNX graphs from onnx-ad, run in ONNX Runtime at a fixed batch size.

    `ce_grad` runs one graph that computes logits, the summed cross-entropy and its input
    gradient together; `vjp` runs the reverse graph of the logits seeded with `adj`.
    GDWSError when onnx-ad is not installed, the input is not float32, or the model is
    QDQ-quantized (onnx-ad would mask its gradients)."""

    name = "onnx-ad"

    def __init__(self, model: onnx.ModelProto, batch_size: int = 64, threads: int | None = None):
        try:
            import onnx_ad  # noqa: F401
        except ImportError:
            raise GDWSError("gradient source onnx-ad needs: pip install onnx-ad==0.3.0") from None
        base, _ = logits_model(model)
        dims, elem = input_shape(base)
        if elem != TensorProto.FLOAT:
            raise GDWSError("onnx-ad gradients need a float32 input")
        if activation_quantizers(base):
            raise GDWSError("onnx-ad differentiates QuantizeLinear as zero (no straight-through estimator): "
                            "its gradients of a QDQ-quantized model are masked; the torch gradient source "
                            "estimates them (BPDA)")
        self.batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else batch_size
        self.base = with_batch(base, self.batch)
        self.threads = threads
        self.x_name = single_io(self.base)[0].name
        self.y_name = single_io(self.base)[1].name
        self._ce = None
        self._vjp = None
        self._fwd = None

    # graphs are built on first use
    def _reverse(self, model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
        import onnx_ad

        try:
            return onnx_ad.reverse(model, inputs=[self.x_name], outputs=outputs, layout="onnx")
        except Exception as e:  # noqa: BLE001 - UnsupportedOperator and friends
            raise GDWSError(f"onnx-ad cannot differentiate the model: {type(e).__name__}: {e}") from None

    def _ce_session(self):
        if self._ce is None:
            m = copy.deepcopy(self.base)
            g = m.graph
            classes = single_io(m)[1].type.tensor_type.shape.dim[-1].dim_value or None
            g.input.append(helper.make_tensor_value_info("gdws_onehot", TensorProto.FLOAT,
                                                         [self.batch, classes or "C"]))
            g.node.extend([
                helper.make_node("LogSoftmax", [self.y_name], ["gdws_logp"], axis=-1),
                helper.make_node("Mul", ["gdws_logp", "gdws_onehot"], ["gdws_lp_y"]),
                helper.make_node("ReduceSum", ["gdws_lp_y"], ["gdws_sum"], keepdims=0),
                helper.make_node("Neg", ["gdws_sum"], ["gdws_loss"]),
            ])
            g.output.append(helper.make_tensor_value_info("gdws_loss", TensorProto.FLOAT, []))
            r = self._reverse(m, ["gdws_loss"])
            self._ce = (make_session(r, threads=self._threads_for(r)), [o.name for o in r.graph.output],
                        [i.name for i in r.graph.input])
        return self._ce

    def _vjp_session(self):
        if self._vjp is None:
            r = self._reverse(self.base, [self.y_name])
            self._vjp = (make_session(r, threads=self._threads_for(r)), [o.name for o in r.graph.output],
                         [i.name for i in r.graph.input])
        return self._vjp

    def _threads_for(self, reverse: onnx.ModelProto) -> int | None:
        """One thread when the graph accumulates with ScatterND(reduction=add): ORT's parallel
        kernel races on duplicate indices (measured: results differing by 8% between calls)."""
        racy = any(n.op_type == "ScatterND" and any(a.name == "reduction" and a.s == b"add" for a in n.attribute)
                   for n in reverse.graph.node)
        return 1 if racy else self.threads

    def _chunks(self, n: int):
        for s in range(0, n, self.batch):
            yield s, min(n, s + self.batch)

    def _pad(self, a: np.ndarray, k: int) -> np.ndarray:
        if k == self.batch:
            return np.ascontiguousarray(a, np.float32)
        pad = np.zeros((self.batch - k, *a.shape[1:]), np.float32)
        return np.concatenate([a.astype(np.float32, copy=False), pad])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits from ONNX Runtime on the fixed-batch model."""
        if self._fwd is None:
            self._fwd = make_session(self.base, threads=self.threads)
        out = []
        for s, e in self._chunks(len(x)):
            out.append(self._fwd.run([self.y_name], {self.x_name: self._pad(x[s:e], e - s)})[0][:e - s])
        return np.concatenate(out)

    def ce_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, d sum_i CE / d x) from one reverse graph run per chunk."""
        sess, outs, ins = self._ce_session()
        seed_name = ins[-1]
        logits, grads = [], []
        for s, e in self._chunks(len(x)):
            k = e - s
            xb = self._pad(x[s:e], k)
            oh = np.zeros((self.batch, self._classes(sess)), np.float32)
            oh[np.arange(k), y[s:e]] = 1.0  # padded rows have no label: zero gradient
            res = sess.run(None, {self.x_name: xb, "gdws_onehot": oh,
                                  seed_name: np.ones((1,), np.float32)})
            d = dict(zip(outs, res))
            logits.append(d[self.y_name][:k])
            grads.append(d[outs[-1]][..., 0][:k])
        return np.concatenate(logits), np.concatenate(grads)

    def _classes(self, sess) -> int:
        for i in sess.get_inputs():
            if i.name == "gdws_onehot" and isinstance(i.shape[1], int):
                return i.shape[1]
        return int(self.forward(np.zeros((1, *self._xshape()), np.float32)).shape[1])

    def _xshape(self):
        return [d.dim_value for d in single_io(self.base)[0].type.tensor_type.shape.dim][1:]

    def vjp(self, x: np.ndarray, adj: np.ndarray) -> np.ndarray:
        """adj^T d logits / d x from the reverse graph of the logits."""
        sess, outs, ins = self._vjp_session()
        grads = []
        for s, e in self._chunks(len(x)):
            k = e - s
            a = self._pad(adj[s:e], k)[..., None]
            res = sess.run([outs[-1]], {self.x_name: self._pad(x[s:e], k), ins[-1]: a})
            grads.append(res[0][..., 0][:k])
        return np.concatenate(grads)
