"""Input gradients of an ONNX classifier, checked against ONNX Runtime (no CLI).

Two gradient sources share one numpy interface (`protocol.GradientSource`):

* ``onnx-ad`` (`onnx_ad_source`): the reverse-mode graph of `onnx_ad.reverse`, run in ONNX
  Runtime. The model's batch is fixed (onnx-ad needs static shapes); batches are padded/chunked.
* ``torch`` (`torch_source`): autograd through `torch_replica.TorchReplica`, a small explicit
  ONNX -> torch.nn.functional interpreter whose operators are the registry `torch_ops.OPS`;
  GDWS layers run fused (`gdws_fusion`), QDQ models with straight-through (BPDA) gradients.

The modules, one job each:

  prepare         one input/output, logits (terminal Softmax cut), fixed batch
  classifier      OrtClassifier (ORT forward passes) and ort_module (ORT forward, source backward, in torch)
  protocol        the GradientSource interface and cross_entropy
  qdq             QDQ models: activation quantizers, the dequantized-surrogate pass
  onnx_ad_source  OnnxADSource
  torch_ops       ONNX operators as torch functions (the registry)
  gdws_fusion     GDWS layers (graph.pattern) evaluated as one conv
  torch_replica   TorchReplica, the interpreter
  torch_source    TorchSource
  sources         the sources by name: SOURCES, installed_sources, make_source
  gate            check_gradient_source (GradientCheck): the pre-attack gate, BPDA included

Nothing here imports torch or onnx_ad at import time. The names below are re-exported for
callers outside the package (tests, tools); code in gdws_onnx imports from the modules.
"""

from gdws_onnx.eval.gradients.classifier import OrtClassifier, ort_module
from gdws_onnx.eval.gradients.gate import BPDA_FD_TOL, BPDA_LOGITS_TOL, GradientCheck, check_gradient_source
from gdws_onnx.eval.gradients.gdws_fusion import GDWSChain
from gdws_onnx.eval.gradients.onnx_ad_source import OnnxADSource
from gdws_onnx.eval.gradients.prepare import input_shape, logits_model, with_batch
from gdws_onnx.eval.gradients.protocol import GradientSource, cross_entropy
from gdws_onnx.eval.gradients.qdq import QDQ_OPS, DequantizedSurrogate, activation_quantizers, dequantized_surrogate
from gdws_onnx.eval.gradients.sources import (
    DEFAULT_SOURCE,
    SOURCE_PACKAGES,
    SOURCES,
    installed_sources,
    make_source,
    package_installed,
)
from gdws_onnx.eval.gradients.torch_replica import TORCH_OPS, TorchReplica
from gdws_onnx.eval.gradients.torch_source import TorchSource

__all__ = [
    "BPDA_FD_TOL", "BPDA_LOGITS_TOL", "DEFAULT_SOURCE", "QDQ_OPS", "SOURCES", "SOURCE_PACKAGES", "TORCH_OPS",
    "DequantizedSurrogate", "GDWSChain", "GradientCheck", "GradientSource", "OnnxADSource", "OrtClassifier",
    "TorchReplica", "TorchSource", "activation_quantizers", "check_gradient_source", "cross_entropy",
    "dequantized_surrogate", "input_shape", "installed_sources", "logits_model", "make_source", "ort_module",
    "package_installed", "with_batch",
]
