"""How far rewritten models move the logits, against their originals: relative L2 error and top-1
agreement on real test images, uniform [0, 1) and clipped Gaussian inputs (docs/auto.md, "The
default": a data-free proxy for robust accuracy that does *not* separate safe from unsafe points).

    python tools/output_proxy.py out/auto/vgg16_fmnist_fgsm_0.15.onnx out/auto/resnet18_small_fgsm_0.1.onnx ...

Each model's original is the zoo model whose name its file name contains (vgg16 otherwise).
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort

from gdws_onnx.data import load_dataset

ZOO = {"vgg16_fmnist_fgsm": "models/vgg16_fmnist_fgsm.onnx", "vgg_small_fgsm": "models/vgg_small_fgsm.onnx",
       "resnet18_small_fgsm": "models/resnet18_small_fgsm.onnx"}


def logits(path: str, x: np.ndarray) -> np.ndarray:
    """The first output of `path` on x, in batches of 64, one thread."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--n", type=int, default=512)
    a = ap.parse_args()
    real = load_dataset("fashion-mnist:test", n=a.n).x.astype(np.float32)
    rng = np.random.default_rng(0)
    inputs = {"real": real, "uniform": rng.random(real.shape, dtype=np.float32),
              "gauss": np.clip(0.5 + 0.25 * rng.standard_normal(real.shape), 0, 1).astype(np.float32)}
    for path in a.models:
        original = ZOO[next((k for k in ZOO if k in path), "vgg16_fmnist_fgsm")]
        cells = []
        for kind, x in inputs.items():
            y0, y = logits(original, x), logits(path, x)
            rel = np.linalg.norm(y - y0) / np.linalg.norm(y0)
            cells.append(f"{kind} relative {rel:.4f} top-1 agreement {(y.argmax(1) == y0.argmax(1)).mean():.3f}")
        print(path, " | ".join(cells))


if __name__ == "__main__":
    main()
