"""TorchReplica: an explicit ONNX -> torch.nn.functional interpreter of one classifier graph.

Each node is evaluated by its entry in the op registry (`torch_ops.OPS`); Conv and the
QuantizeLinear/DequantizeLinear pair go through methods of the replica (`_conv`, `_quantize`,
`_dequantize`), the points where a subclass observes convs (alphas.noise_gain) or a caller swaps
the straight-through estimator. torch is imported when a replica is built, never at import time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.gradients import torch_ops
from gdws_onnx.eval.gradients.gdws_fusion import GDWSChain, fuse_gdws_chains, fused_weight
from gdws_onnx.eval.gradients.prepare import logits_model, single_io
from gdws_onnx.eval.gradients.qdq import QDQ_OPS, QDQ_TYPES, is_qdq
from gdws_onnx.graph.convs import node_attrs

# The float operators the replica evaluates (QDQ_OPS besides: constant Q/DQ are folded, activation
# pairs differentiated by the straight-through estimator (BPDA), see torch_ops.quantize).
TORCH_OPS = tuple(torch_ops.OPS)

# Operators evaluated by a method of the replica (overridable) rather than straight from OPS.
_METHOD_OPS = {
    "Conv": lambda rep, node, ins, a: rep._conv(node, ins, a),
    "QuantizeLinear": lambda rep, node, ins, a: rep._quantize(ins, a),
    "DequantizeLinear": lambda rep, node, ins, a: rep._dequantize(ins, a),
}


class TorchReplica:
    """An explicit ONNX -> torch.nn.functional interpreter of one classifier graph.

    Supports the operators in TORCH_OPS and QDQ_OPS (the attributes ONNX Runtime accepts for
    them on these CNNs); anything else raises GDWSError at construction naming the operator(s).
    Shape-computing subgraphs (Shape/Gather/Concat on int64) are evaluated eagerly. With
    `fuse_gdws`, each GDWS layer is evaluated as the one conv it equals (see gdws_fusion).
    Calling the replica on a torch tensor returns the logits (a terminal Softmax is cut)."""

    name = "torch"

    def __init__(self, model: onnx.ModelProto, dtype: str = "float32", fuse_gdws: bool = False):
        import torch

        self.torch = torch
        self.model, _ = logits_model(model)
        opset = {o.domain: o.version for o in self.model.opset_import}
        self.opset = opset.get("", opset.get("ai.onnx", 13))
        bad = sorted({n.op_type for n in self.model.graph.node
                      if n.op_type not in TORCH_OPS + QDQ_OPS or n.domain not in ("", "ai.onnx")})
        if bad:
            raise GDWSError(f"the torch gradient source does not support operator(s) {', '.join(bad)} "
                            "(the onnx-ad gradient source may; the square attack needs forward passes only)")
        init_types = {t.name: t.data_type for t in self.model.graph.initializer}
        odd = sorted({TensorProto.DataType.Name(init_types[i]) for n in self.model.graph.node if n.op_type in QDQ_OPS
                      for i in n.input if init_types.get(i, TensorProto.FLOAT) not in QDQ_TYPES})
        if odd:
            raise GDWSError(f"the torch gradient source does not support {', '.join(odd)} quantization "
                            "(8/16-bit integers only; the square attack needs forward passes only)")
        self.dtype = getattr(torch, dtype)
        self.consts = {}
        for t in self.model.graph.initializer:
            self.consts[t.name] = self.tensor(numpy_helper.to_array(t))
        self.x_name, self.y_name = (v.name for v in single_io(self.model))
        self.nodes: list = self._fold_constant_qdq(list(self.model.graph.node))
        # activation QuantizeLinear nodes left after folding: gradients through them are the
        # straight-through estimator, an approximation (BPDA), not the derivative of the model
        self.fake_quant = [n for n in self.nodes if n.op_type == "QuantizeLinear"]
        self.bpda = bool(self.fake_quant)
        if fuse_gdws:
            self.nodes = fuse_gdws_chains(self.nodes, self.consts, self.y_name)
        self._q_cache: dict = {}
        # values computed afresh at every call (name -> function of nothing), after the constants:
        # a fine-tune's fake-quantized weights (recover.params.make_trainable)
        self.derived: dict = {}

    def tensor(self, a: np.ndarray):
        """A torch copy of `a`, floating tensors in the replica's dtype."""
        t = self.torch.from_numpy(np.array(a, copy=True))
        return t.to(self.dtype) if t.is_floating_point() else t

    def _fold_constant_qdq(self, nodes: list) -> list:
        """Evaluate once every QuantizeLinear/DequantizeLinear whose inputs are all constants
        (int8 weights and int32 biases -> DequantizeLinear); their values join `consts`."""
        kept = []
        for node in nodes:
            if is_qdq(node) and all(not i or i in self.consts for i in node.input):
                with self.torch.no_grad():
                    self.consts[node.output[0]] = self._op(node, [self.consts[i] if i else None for i in node.input],
                                                           node_attrs(node))
                continue
            kept.append(node)
        return kept

    def __call__(self, x):
        torch = self.torch
        env = dict(self.consts)
        for name, value in self.derived.items():
            env[name] = value()
        env[self.x_name] = x
        env[""] = None
        for node in self.nodes:
            if isinstance(node, GDWSChain):
                env[node.output] = self._chain(node, env[node.input])
                continue
            ins = [env[i] if i else None for i in node.input]
            try:
                outs = self._op(node, ins, node_attrs(node))
            except GDWSError:
                raise
            except Exception as e:  # noqa: BLE001
                raise GDWSError(f"torch gradient source failed on {node.op_type} "
                                f"'{node.name or node.output[0]}': {e}") from None
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for name, val in zip(node.output, outs):
                if name:
                    env[name] = val
        out = env[self.y_name]
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)

    def _op(self, node: onnx.NodeProto, ins: list, a: dict):
        """One node's output(s), by the replica's method or the registry entry for its op_type."""
        fn = _METHOD_OPS.get(node.op_type) or torch_ops.OPS.get(node.op_type)
        if fn is None:
            raise GDWSError(f"the torch gradient source does not support operator {node.op_type}")
        return fn(self, node, ins, a)

    def _conv(self, node: onnx.NodeProto, ins: list, a: dict):
        """Conv (torch_ops.conv); a subclass may override it to observe conv inputs and outputs."""
        return torch_ops.conv(self, node, ins, a)

    def _spatial_pads(self, x, a: dict, k: list[int], s: list[int], d: list[int]) -> list[int]:
        """The resolved pads of a conv with attributes `a` on input x (torch_ops.spatial_pads)."""
        return torch_ops.spatial_pads(x, a, k, s, d)

    def _quantize(self, ins: list, a: dict):
        """QuantizeLinear with the clipped straight-through estimator (torch_ops.quantize)."""
        return torch_ops.quantize(self.torch, ins, a)

    def _dequantize(self, ins: list, a: dict):
        """DequantizeLinear (torch_ops.dequantize)."""
        return torch_ops.dequantize(self.torch, ins, a)

    def _chain(self, chain: GDWSChain, x):
        """Gather -> depthwise -> 1x1 as the one conv it equals (its weight cached per input width)."""
        key = (chain.output, x.shape[1])
        if key not in self._q_cache:
            self._q_cache[key] = fused_weight(self.torch, chain, x.shape[1])
        q, b = self._q_cache[key]
        return self._conv(chain.dw_node, [x, q, b], chain.dw_attrs)
