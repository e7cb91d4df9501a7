"""Original vs GDWS vs INT8 on an edge EP (OpenVINO by default), and where `--target latency`
chooses other per-layer realizations on it than on the CPU EP.

For each model: GDWS by MACs (default error budget 0.1), GDWS by latency measured on --ep
(`optimize --target latency --ep EP`, batches as given), and ORT static INT8 (QDQ, per-channel,
256 Fashion-MNIST training images); all timed interleaved against the original on --ep at each
batch (ratio = model / original, median [p10-p90] of per-round ratios). With --compare-ep, the
latency target also runs on that EP and the layers whose chosen realization differs are listed.
Needs an ONNX Runtime with the EP (docs/cli.md, "Execution providers"): for OpenVINO

    python -m venv /tmp/venv_ov && /tmp/venv_ov/bin/pip install . && /tmp/venv_ov/bin/pip uninstall -y onnxruntime \
        && /tmp/venv_ov/bin/pip install onnxruntime-openvino==1.24.1
    /tmp/venv_ov/bin/python tools/edge_ep_latency.py --threads 1 --json out/edge_openvino.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx  # noqa: E402

from gdws_onnx import optimize  # noqa: E402
from gdws_onnx.data import load_fashion_mnist  # noqa: E402
from gdws_onnx.files import write_json_atomic  # noqa: E402
from gdws_onnx.peers.quantize import QuantizeInt8Pass  # noqa: E402
from gdws_onnx.runtime.bench import BenchConfig, compare_models, environment  # noqa: E402
from gdws_onnx.runtime.providers import provider_source  # noqa: E402

ZOO = ("models/vgg_small_fgsm.onnx", "models/resnet18_small_fgsm.onnx", "models/vgg_small_standard.onnx")


def choices(report) -> dict[str, str]:
    """layer -> the realization `--target latency` kept ('G=48', 'G=64 mult') or why none."""
    out = {}
    for name, entry in report.latency["layers"].items():
        i = entry["chosen"]
        layer = next(r for r in report.layers if r.name == name)
        if i is None or layer.reason:
            out[name] = "-"
        else:
            o = entry["options"][i]
            out[name] = f"G={o['total_rank']}" + (" mult" if o["multiplier"] else "")
    return out


def best_ratios(report) -> dict[str, float | None]:
    """layer -> the lowest, over its measured realizations, of the realization's worst-batch
    median layer ratio (GDWS / original)."""
    return {name: min((max(r["median"] for r in o["ratios"].values()) for o in entry["options"]), default=None)
            for name, entry in report.latency["layers"].items()}


def latency_target(model: onnx.ModelProto, ep: str, batches: list[int], threads: int | None):
    return optimize(model, target="latency", ep=ep, batches=batches, threads=threads, cache="", verify=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(ZOO))
    ap.add_argument("--ep", default="openvino")
    ap.add_argument("--compare-ep", default="cpu", help="'' to skip the per-layer comparison")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    env = {**environment(BenchConfig(ep=a.ep, threads=a.threads)), "ep_package": provider_source(a.ep)}
    print(json.dumps(env), flush=True)
    x, _ = load_fashion_mnist("train")
    rows = []
    for path in a.models:
        model = onnx.load(path)
        gdws, _ = optimize(model, target="macs", verify=False)
        gdws_lat, rep = latency_target(model, a.ep, batches, a.threads)
        int8 = QuantizeInt8Pass(x[:256]).call(onnx.ModelProto.FromString(model.SerializeToString())).model
        row = {"model": os.path.basename(path), "ratios": {}, "original_ms": {},
               "latency_target": {"rewritten": len(rep.rewritten), "speedup": rep.latency["speedup"],
                                  "choices": choices(rep), "best_layer_ratio": best_ratios(rep)}}
        for b in batches:
            _, ratios = compare_models([model, gdws, gdws_lat, int8], ["original", "gdws", "gdws_latency", "int8"],
                                       BenchConfig(ep=a.ep, batch=b, runs=a.runs, warmup=5, threads=a.threads))
            row["original_ms"][b] = ratios[0].baseline_ms
            row["ratios"][b] = {r.candidate: [r.median, r.p10, r.p90] for r in ratios}
            print(f"{row['model']:28s} batch {b:3d}  original {ratios[0].baseline_ms:8.3f} ms  " + "  ".join(
                f"{r.candidate} {r.median:.3f} [{r.p10:.3f}-{r.p90:.3f}]" for r in ratios), flush=True)
        if a.compare_ep:
            _, other = latency_target(model, a.compare_ep, batches, a.threads)
            mine, theirs = row["latency_target"]["choices"], choices(other)
            row["differs_from_" + a.compare_ep] = {n: {a.ep: mine[n], a.compare_ep: theirs.get(n)}
                                                   for n in mine if mine[n] != theirs.get(n)}
            row["best_layer_ratio_" + a.compare_ep] = best_ratios(other)
        print(json.dumps({k: v for k, v in row.items() if k not in ("ratios", "original_ms")}), flush=True)
        rows.append(row)
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        write_json_atomic(a.json, {"environment": env, "rows": rows}, indent=2)


if __name__ == "__main__":
    main()
