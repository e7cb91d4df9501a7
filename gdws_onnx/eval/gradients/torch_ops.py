"""ONNX operators as torch.nn.functional calls: the op registry of the torch replica.

`OPS` maps an ONNX op_type to a function `(ctx, node, inputs, attrs) -> output(s)`; `ctx` is the
interpreter (`OpContext`: its torch module, float dtype and opset). Every function computes what
ONNX Runtime computes for the attributes it accepts on these CNNs, and raises GDWSError naming
what it does not support. QuantizeLinear/DequantizeLinear (`quantize`, `dequantize`) are not in
`OPS`: the replica evaluates them (constants folded once, activations by a straight-through
estimator). It also routes Conv through a method of its own, so a subclass can observe convs.
torch is never imported here: it comes in through `ctx.torch`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gdws_onnx.core.geometry import resolved_pads
from gdws_onnx.errors import GDWSError
from gdws_onnx.eval.gradients.qdq import QRANGES


class OpContext(Protocol):
    """What an op function needs from the interpreter running it."""

    torch: Any  # the torch module
    dtype: Any  # torch float dtype of floating tensors
    opset: int  # the model's default-domain opset

    def tensor(self, a: np.ndarray) -> Any:
        """A torch tensor copy of `a`, floating tensors in `dtype`."""


OpFunction = Callable[[OpContext, onnx.NodeProto, list, dict], Any]


def torch_pad_list(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] over the last n dims -> torch F.pad order (last dim first)."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def spatial_pads(x, a: dict, k: list[int], s: list[int], d: list[int]) -> list[int]:
    """The pads [b1..bn, e1..en] of a Conv/pool node with attributes `a` on input x (auto_pad resolved)."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return resolved_pads(list(x.shape[2:]), k, s, a.get("pads"), d, auto)


# ----------------------------------------------------------------------------- element-wise

def _identity(ctx, node, ins, a):
    return ins[0]


def _dropout(ctx, node, ins, a):
    return [ins[0], None]


def _relu(ctx, node, ins, a):
    return ctx.torch.nn.functional.relu(ins[0])


def _leaky_relu(ctx, node, ins, a):
    return ctx.torch.nn.functional.leaky_relu(ins[0], a.get("alpha", 0.01))


def _sigmoid(ctx, node, ins, a):
    return ctx.torch.sigmoid(ins[0])


def _tanh(ctx, node, ins, a):
    return ctx.torch.tanh(ins[0])


def _neg(ctx, node, ins, a):
    return -ins[0]


def _binary(ctx, node, ins, a):
    """Add, Sub, Mul, Div (numpy broadcasting; Div of integers truncates, as ONNX Runtime)."""
    torch, op = ctx.torch, node.op_type
    if ctx.opset < 7 and a.get("broadcast"):
        raise GDWSError(f"{op} with legacy broadcast attribute (opset < 7) is not supported")
    f = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op]
    if op == "Div" and not ins[0].is_floating_point():
        return torch.div(ins[0], ins[1], rounding_mode="trunc")
    return f(ins[0], ins[1])


def _sum(ctx, node, ins, a):
    out = ins[0]
    for t in ins[1:]:
        out = out + t
    return out


def _clip(ctx, node, ins, a):
    torch = ctx.torch
    lo = a.get("min") if ctx.opset < 11 else (ins[1] if len(ins) > 1 else None)
    hi = a.get("max") if ctx.opset < 11 else (ins[2] if len(ins) > 2 else None)
    out = ins[0]
    if lo is not None:
        out = torch.maximum(out, torch.as_tensor(lo, dtype=out.dtype))
    if hi is not None:
        out = torch.minimum(out, torch.as_tensor(hi, dtype=out.dtype))
    return out


def _softmax(ctx, node, ins, a):
    """Softmax / LogSoftmax: one axis from opset 13, the flattened trailing axes before."""
    F = ctx.torch.nn.functional
    x = ins[0]
    f = F.softmax if node.op_type == "Softmax" else F.log_softmax
    if ctx.opset >= 13:
        return f(x, dim=a.get("axis", -1))
    ax = a.get("axis", 1) % x.dim()
    flat = x.reshape(int(np.prod(x.shape[:ax])), -1)
    return f(flat, dim=1).reshape(x.shape)


# ----------------------------------------------------------------------------- constants, shapes, casts

def _constant(ctx, node, ins, a):
    if "value" in a:
        return ctx.tensor(numpy_helper.to_array(a["value"]))
    for k in ("value_float", "value_int"):
        if k in a:
            return ctx.tensor(np.array(a[k], np.float32 if k == "value_float" else np.int64))
    for k in ("value_floats", "value_ints"):
        if k in a:
            return ctx.tensor(np.array(a[k], np.float32 if k == "value_floats" else np.int64))
    raise GDWSError(f"Constant '{node.name}' has an unsupported value attribute")


def _constant_of_shape(ctx, node, ins, a):
    v = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    shape = [int(s) for s in ins[0].tolist()]
    return ctx.tensor(np.full(shape, v.reshape(-1)[0], dtype=v.dtype))


def _shape(ctx, node, ins, a):
    return ctx.torch.tensor(list(ins[0].shape), dtype=ctx.torch.int64)


def _cast(ctx, node, ins, a):
    """Casts to any float type give the replica's dtype; integer casts are exact."""
    npdt = helper.tensor_dtype_to_np_dtype(a["to"])
    if np.issubdtype(npdt, np.floating):
        return ins[0].to(ctx.dtype)
    return ins[0].to(getattr(ctx.torch, np.dtype(npdt).name))


def _gather(ctx, node, ins, a):
    torch = ctx.torch
    x, idx = ins
    ax = a.get("axis", 0) % x.dim()
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[ax], idx)
    out = torch.index_select(x, ax, idx.reshape(-1))
    return out.reshape(*x.shape[:ax], *idx.shape, *x.shape[ax + 1:])


def _flatten(ctx, node, ins, a):
    x = ins[0]
    ax = a.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:ax])), -1)


def _reshape(ctx, node, ins, a):
    x = ins[0]
    shape = list(a["shape"]) if ctx.opset < 5 else [int(s) for s in ins[1].tolist()]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(ctx, node, ins, a):
    perm = a.get("perm", list(reversed(range(ins[0].dim()))))
    return ins[0].permute(*perm)


def _squeeze(ctx, node, ins, a):
    """Squeeze / Unsqueeze (axes an attribute before opset 13, an input from 13)."""
    x = ins[0]
    axes = a.get("axes") if ctx.opset < 13 else (ins[1].tolist() if len(ins) > 1 and ins[1] is not None else None)
    if node.op_type == "Squeeze":
        if axes is None:
            return x.squeeze()
        axes = sorted(ax % x.dim() for ax in axes)
        for ax in reversed(axes):
            x = x.squeeze(ax)
        return x
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _concat(ctx, node, ins, a):
    ts = [t for t in ins if t is not None]
    if any(t.is_floating_point() for t in ts):
        ts = [t.to(ctx.dtype) for t in ts]
    return ctx.torch.cat(ts, dim=a["axis"])


def _pad(ctx, node, ins, a):
    F = ctx.torch.nn.functional
    x = ins[0]
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if ctx.opset < 11:
        pads, value = list(a["pads"]), a.get("value", 0.0)
    else:
        pads = [int(p) for p in ins[1].tolist()]
        value = float(ins[2].reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
        if len(ins) > 3 and ins[3] is not None:
            raise GDWSError("Pad with an axes input is not supported")
    n = x.dim()
    if any(pads[i] or pads[i + n] for i in range(2)) and mode != "constant":
        raise GDWSError("Pad of batch/channel axes is only supported in constant mode")
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if tmode is None:
        raise GDWSError(f"Pad mode {mode} is not supported")
    if tmode == "constant":
        return F.pad(x, torch_pad_list(pads), value=value)
    sp = pads[2:n] + pads[n + 2:]
    return F.pad(x, torch_pad_list(sp), mode=tmode)


# ----------------------------------------------------------------------------- linear layers, normalisation, pooling

def _gemm(ctx, node, ins, a):
    A, B = ins[0], ins[1]
    if a.get("transA", 0):
        A = A.t()
    if a.get("transB", 0):
        B = B.t()
    out = a.get("alpha", 1.0) * (A @ B)
    if len(ins) > 2 and ins[2] is not None:
        out = out + a.get("beta", 1.0) * ins[2]
    return out


def _matmul(ctx, node, ins, a):
    return ctx.torch.matmul(ins[0], ins[1])


def _batch_norm(ctx, node, ins, a):
    if a.get("training_mode", 0):
        raise GDWSError("BatchNormalization in training mode is not supported")
    x, s, b, m, v = ins[:5]
    return ctx.torch.nn.functional.batch_norm(x, m, v, s, b, training=False, eps=a.get("epsilon", 1e-5))


def _lrn(ctx, node, ins, a):
    return ctx.torch.nn.functional.local_response_norm(ins[0], a["size"], alpha=a.get("alpha", 1e-4),
                                                       beta=a.get("beta", 0.75), k=a.get("bias", 1.0))


def _reduce_mean(ctx, node, ins, a):
    x = ins[0]
    axes = a.get("axes") if ctx.opset < 18 else (ins[1].tolist() if len(ins) > 1 and ins[1] is not None else None)
    if axes is None:
        axes = list(range(x.dim()))
    return x.mean(dim=tuple(axes), keepdim=bool(a.get("keepdims", 1)))


def _global_average_pool(ctx, node, ins, a):
    return ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)


def _global_max_pool(ctx, node, ins, a):
    return ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True)


def conv(ctx: OpContext, node: onnx.NodeProto, ins: list, a: dict):
    """Conv (1-3 spatial dims, groups, dilations, auto_pad; asymmetric pads by an explicit F.pad)."""
    F = ctx.torch.nn.functional
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    n = w.dim() - 2
    k = list(a.get("kernel_shape", w.shape[2:]))
    s = list(a.get("strides", [1] * n))
    d = list(a.get("dilations", [1] * n))
    pads = spatial_pads(x, a, k, s, d)
    f = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(n)
    if f is None:
        raise GDWSError(f"Conv with {n} spatial dims is not supported")
    if pads[:n] == pads[n:]:
        return f(x, w, b, stride=s, padding=pads[:n], dilation=d, groups=a.get("group", 1))
    x = F.pad(x, torch_pad_list(pads))
    return f(x, w, b, stride=s, padding=0, dilation=d, groups=a.get("group", 1))


def _pool(ctx, node, ins, a):
    """MaxPool / AveragePool; pads torch cannot take (asymmetric, over half the kernel) are applied
    explicitly, with -inf for MaxPool and a divisor counting only real pixels for AveragePool."""
    torch = ctx.torch
    F = torch.nn.functional
    x = ins[0]
    k = list(a["kernel_shape"])
    n = len(k)
    s = list(a.get("strides", [1] * n))
    d = list(a.get("dilations", [1] * n))
    pads = spatial_pads(x, a, k, s, d)
    ceil = bool(a.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        if len(node.output) > 1 and node.output[1]:
            raise GDWSError("MaxPool with an Indices output is not supported")
        f = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
        if pads[:n] == pads[n:] and all(p <= kk // 2 for p, kk in zip(pads[:n], k)):
            return f(x, k, s, pads[:n], d, ceil_mode=ceil)
        x = F.pad(x, torch_pad_list(pads), value=-float("inf"))
        return f(x, k, s, 0, d, ceil_mode=ceil)
    if any(dd != 1 for dd in d):
        raise GDWSError("AveragePool with dilations is not supported")
    f = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    include = bool(a.get("count_include_pad", 0))
    if pads[:n] == pads[n:] and all(p <= kk // 2 for p, kk in zip(pads[:n], k)):
        return f(x, k, s, pads[:n], ceil_mode=ceil, count_include_pad=include)
    if ceil:
        raise GDWSError("AveragePool with asymmetric pads and ceil_mode is not supported")
    xp = F.pad(x, torch_pad_list(pads))
    summed = f(xp, k, s, 0) * float(np.prod(k))
    if include:
        return summed / float(np.prod(k))
    ones = F.pad(torch.ones_like(x[:1, :1]), torch_pad_list(pads))
    return summed / (f(ones, k, s, 0) * float(np.prod(k)))


# ----------------------------------------------------------------------------- QuantizeLinear / DequantizeLinear
# opsets 10-21; block_size, int4 and float8 refused

def qparam(p, x, a: dict):
    """A scale or zero point broadcast against x: scalar (per tensor) or 1-D along `axis`."""
    if p.numel() == 1:
        return p.reshape(())
    if p.dim() != 1:
        raise GDWSError("QuantizeLinear/DequantizeLinear with a blocked (N-D) scale is not supported")
    shape = [1] * x.dim()
    shape[a.get("axis", 1) % x.dim()] = p.numel()
    return p.reshape(shape)


def qrange(torch, zp, a: dict) -> tuple[int, int]:
    """Saturation bounds of QuantizeLinear's integer output type: the zero point's type,
    else the `output_dtype` attribute (opset 21), else uint8."""
    if zp is not None:
        rng = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767),
               getattr(torch, "uint16", None): (0, 65535), torch.int32: (-2 ** 31, 2 ** 31 - 1)}.get(zp.dtype)
    else:
        rng = QRANGES.get(a.get("output_dtype", 0) or TensorProto.UINT8)
    if rng is None:
        raise GDWSError(f"QuantizeLinear to {zp.dtype if zp is not None else a.get('output_dtype')} "
                        "is not supported (int8/uint8/int16/uint16 only)")
    return rng


def quantize(torch, ins: list, a: dict):
    """y = saturate(round_half_even(x / y_scale) + y_zero_point), as ONNX Runtime computes it,
    returned as a float tensor holding the integers.

    Backward: the clipped straight-through estimator (Bengio et al. 2013; PyTorch's
    FakeQuantize; BPDA, Athalye et al. 2018): dy/dx = 1/y_scale where the unsaturated integer
    round(x/s) + zp lies inside the type's range, 0 where it saturates. The rounding is
    treated as the identity; the saturation is not, because ONNX Runtime's quantizer drops
    Relu/Clip before a QuantizeLinear whose range already clips there (zero point -128 for
    int8 after a Relu): passing gradients through the clip region would differentiate a
    network without its ReLUs. Measured on the zoo VGG quantized by ORT (s8, per channel):
    identity everywhere fails the BPDA gate (median relative error 1.0 against the dequantized
    surrogate) and PGD-10 with it leaves 84% of 64 test images robust, against 73% with the
    clipped estimator."""
    if a.get("block_size", 0):
        raise GDWSError("QuantizeLinear with block_size (blocked quantization) is not supported")
    x, s = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    lo, hi = qrange(torch, zp, a)
    s = qparam(s.to(x.dtype), x, a)
    z = qparam(zp.to(x.dtype), x, a) if zp is not None else 0.0
    v = x / s
    r = torch.round(v) + z  # torch.round: half to even, as ONNX Runtime (nearbyint)
    q = r.clamp(lo, hi)
    if not x.requires_grad:
        return q
    inside = ((r >= lo) & (r <= hi)).to(x.dtype)
    return q.detach() + inside * (v - v.detach())


def dequantize(torch, ins: list, a: dict):
    """y = (x - x_zero_point) * x_scale (the difference exact in integers for int32 biases)."""
    if a.get("block_size", 0):
        raise GDWSError("DequantizeLinear with block_size (blocked quantization) is not supported")
    x, s = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    if not x.is_floating_point():  # an integer constant (weights, biases)
        d = x.to(torch.int64)
        if zp is not None:
            d = d - qparam(zp.to(torch.int64), x, a)
        return d.to(s.dtype) * qparam(s, x, a)
    if zp is not None:
        x = x - qparam(zp.to(x.dtype), x, a)
    return x * qparam(s.to(x.dtype), x, a)


# ----------------------------------------------------------------------------- the registry

OPS: dict[str, OpFunction] = {
    "Conv": conv,
    "Gather": _gather, "Relu": _relu, "LeakyRelu": _leaky_relu, "Sigmoid": _sigmoid, "Tanh": _tanh,
    "BatchNormalization": _batch_norm, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _global_average_pool, "GlobalMaxPool": _global_max_pool, "Gemm": _gemm,
    "MatMul": _matmul, "Add": _binary, "Mul": _binary, "Sub": _binary, "Div": _binary, "Sum": _sum,
    "Neg": _neg, "Flatten": _flatten, "Reshape": _reshape, "Identity": _identity, "Dropout": _dropout,
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Shape": _shape, "Cast": _cast,
    "Concat": _concat, "Clip": _clip, "Softmax": _softmax, "LogSoftmax": _softmax, "Pad": _pad,
    "Transpose": _transpose, "Squeeze": _squeeze, "Unsqueeze": _squeeze, "LRN": _lrn,
    "ReduceMean": _reduce_mean,
}
