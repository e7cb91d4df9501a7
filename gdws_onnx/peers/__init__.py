"""Peer model constructions GDWS is compared with: spatial SVD, filter pruning, ONNX Runtime static INT8.

One module each; every construction is a graph pass (`graph/passes.py`): `Pass(options).call(model)
-> PassResult(model, modified, report)`, with a PeerReport; the per-conv ones (spatial SVD, pruning)
edit the model in place and say in `check(site)` why a conv is skipped; INT8 returns a new model.
IR version, opsets, metadata and I/O names are kept.

Spatial SVD (the Qualcomm AIMET scheme) splits a 2-D Conv with group 1 into a vertical conv
(I -> r, kernel kh x 1) and a horizontal conv (r -> O, kernel 1 x kw). With W of shape
(O, I, kh, kw), M[(i,y),(o,x)] = W[o,i,y,x] is an (I kh) x (O kw) matrix; the rank-r truncated
SVD M ~= U_r S_r V_r^T gives A = U_r S_r^1/2 and B = S_r^1/2 V_r^T (Eckart-Young optimal, exact
at r = min(I kh, O kw)). New nodes are named `<conv>/ssvd/a|b` (cf. `<conv>/gdws/...`).

Channel pruning drops the smallest-L1-norm output filters of a conv and the matching input
channels of the conv it feeds (no fine-tuning); nodes keep their names.

INT8 is ORT's static QDQ quantization (MinMax calibration) of a float model, GDWS-rewritten
or not; its conv structure, and so its conv MACs, are the float model's.
"""

from gdws_onnx.peers.common import PeerLayer, PeerReport, PeerSite
from gdws_onnx.peers.prune import PruneChannelsPass, PruneSite, channel_chain, filter_norms, kept_filters
from gdws_onnx.peers.quantize import QuantizeInt8Pass, calibration_batches, restore_ir_version
from gdws_onnx.core.spatial_svd import (
    dense_conv_macs,
    relative_energy,
    relative_error,
    rank_at_error,
    spatial_factors,
    spatial_matrix,
    spatial_reconstruct,
    spatial_singular_values,
    spatial_spectrum,
    ssvd_macs_per_rank,
)
from gdws_onnx.graph.spatial_svd import geometry
from gdws_onnx.peers.spatial_svd import SpatialSVDPass

__all__ = ["PeerLayer", "PeerReport", "PeerSite", "PruneSite", "SpatialSVDPass", "PruneChannelsPass",
           "QuantizeInt8Pass", "calibration_batches", "channel_chain", "dense_conv_macs", "filter_norms", "geometry",
           "kept_filters", "rank_at_error", "relative_energy", "relative_error", "restore_ir_version",
           "spatial_factors", "spatial_matrix", "spatial_reconstruct", "spatial_singular_values", "spatial_spectrum",
           "ssvd_macs_per_rank"]
