"""Experiment (issue 15's "rank buckets"): a Gather-free realization of uneven ranks, measured
against the Gather form and the dense conv on one layer of the paper-width VGG-16, float and INT8.

Prefix-stacked form: with the input channels sorted by rank (descending; the permutation could be
folded into the producing conv for free), term t is a Slice of the first P_t channels (those with
rank > t) -> depthwise conv -> all terms concatenated -> the 1x1 conv. Same MACs as the Gather
form, no Gather (Slice and Concat pass through ORT's NHWC transpose optimizer). Checks exactness
against the Gather form, then times dense / Gather / prefix interleaved (batch 1, 1 thread).

    python tools/prefix_realization.py 1168     # G: the layer's total rank (MEGO ranks)
"""
import sys
import numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__))))
from gdws_onnx.core import decompose, allocate
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.graph.rewrite import layer_model
from gdws_onnx.pipeline.int8 import quantize_for_timing
from gdws_onnx.runtime.bench import BenchConfig, compare_models

m = onnx.load(__import__('os').path.join(sys.path[0], 'models', 'vgg16_fmnist_fgsm.onnx'))
sites = {s.name: s for s in find_convs(m)}
site = sites['/features/features.27/Conv']
spec = decompose.spectrum(site.weight, 1)
sc = decompose.scores(spec, np.ones(spec.in_channels))
G = int(sys.argv[1]) if len(sys.argv) > 1 else 1168
ranks = allocate.mego(sc, G)
b = 1
dense = layer_model(site, b)
gath = layer_model(site, b, decompose.factors(spec, ranks))

# prefix-stacked (assumes the producer already emits channels sorted by rank, descending)
order = np.argsort(-ranks, kind="stable")
r_sorted = ranks[order]
C, M = spec.in_channels, spec.out_channels
H = site.in_spatial
nodes, inits, outs, cols = [], [], [], []
for t in range(int(r_sorted.max())):
    P = int((r_sorted > t).sum())
    if P == 0:
        break
    chans = order[:P]
    dw = spec.vt[chans, t].reshape(P, 1, 3, 3).astype(np.float32)
    inits.append(numpy_helper.from_array(dw, f"dw{t}"))
    xs = f"xs{t}"
    nodes.append(helper.make_node("Slice", ["x", f"st{t}", f"en{t}", "ax"], [xs]))
    inits.append(numpy_helper.from_array(np.array([0], np.int64), f"st{t}"))
    inits.append(numpy_helper.from_array(np.array([P], np.int64), f"en{t}"))
    nodes.append(helper.make_node("Conv", [xs, f"dw{t}"], [f"d{t}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=P))
    outs.append(f"d{t}")
    cols.append(spec.u[chans, :, t] * spec.s[chans, t][:, None])  # (P, M)
inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
pw = np.concatenate(cols, 0).T.reshape(M, -1, 1, 1).astype(np.float32)
inits.append(numpy_helper.from_array(pw, "pw"))
nodes.append(helper.make_node("Concat", outs, ["cat"], axis=1))
nodes.append(helper.make_node("Conv", ["cat", "pw"], ["y"], kernel_shape=[1, 1]))
g = helper.make_graph(nodes, "p", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, C, *H])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
pre = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); pre.ir_version = 8

# exactness vs gather form on sorted input
import onnxruntime as ort
x = np.random.rand(b, C, *H).astype(np.float32)
ya = ort.InferenceSession(gath.SerializeToString()).run(None, {"x": x})[0]
yb = ort.InferenceSession(pre.SerializeToString()).run(None, {"x": x[:, order]})[0]
print("G", G, "terms", len(outs), "exact rel", np.linalg.norm(ya - yb) / np.linalg.norm(ya))
cfg = BenchConfig(batch=b, threads=1, runs=60)
for label, conv in (("float", lambda z: z), ("int8", lambda z: quantize_for_timing(z, None))):
    ms = [conv(dense), conv(gath), conv(pre)]
    _, (rg, rp) = compare_models(ms, ["dense", "gather", "prefix"], cfg)
    print(label, "gather", round(rg.median, 3), [round(v, 3) for v in rg.bounds()], "prefix", round(rp.median, 3), [round(v, 3) for v in rp.bounds()])
