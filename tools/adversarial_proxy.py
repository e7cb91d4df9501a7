"""Does a rewrite's effect on the *original's adversarial examples* predict its white-box robust
drop? A diagnostic for a data-driven allocation (issue 25), not a robustness measurement: the
robust drop itself is always measured by attacking the rewritten model (`validate`).

    python tools/adversarial_proxy.py out/auto2/vgg_small_fgsm_0.15.onnx out/auto2/resnet18_small_fgsm_0.1.onnx ...

For each original (the zoo model whose name the file name contains) it attacks the first --n
samples of --data with PGD-10 (eps 0.1, white-box on the original, ORT as judge), then scores every
rewritten model on those inputs: its accuracy there against the original's (the transfer drop),
top-1 disagreement with the original, relative logit error and the mean KL(original || rewritten).
"""

from __future__ import annotations

import argparse

import numpy as np

from gdws_onnx.data import load_dataset
from gdws_onnx.eval.attacks import AttackSettings, pgd
from gdws_onnx.eval.gradients.classifier import OrtClassifier
from gdws_onnx.eval.gradients.torch_source import TorchSource
from gdws_onnx.graph.model_io import load_model

ZOO = {"vgg16_fmnist_fgsm": "models/vgg16_fmnist_fgsm.onnx", "vgg_small_fgsm": "models/vgg_small_fgsm.onnx",
       "resnet18_small_fgsm": "models/resnet18_small_fgsm.onnx"}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="fashion-mnist:train")
    ap.add_argument("--n", type=int, default=512)
    a = ap.parse_args()
    ds = load_dataset(a.data, n=a.n)
    x, y = ds.x.astype(np.float32), ds.y
    adv: dict[str, np.ndarray] = {}
    for path in a.models:
        key = next((k for k in ZOO if k in path), "vgg16_fmnist_fgsm")
        orig = OrtClassifier(load_model(ZOO[key]).model, threads=1)
        if key not in adv:
            src = TorchSource(load_model(ZOO[key]).model, batch_size=128, threads=1)
            adv[key] = pgd(orig, src, x, y, AttackSettings(name="pgd", eps=0.1, steps=10, seed=0), batch_size=128).x_adv
        xa = adv[key]
        new = OrtClassifier(load_model(path).model, threads=1)
        z0, z1 = orig(xa).astype(np.float64), new(xa).astype(np.float64)
        c0, c1 = orig(x).argmax(1) == y, new(x).argmax(1) == y
        p0, p1 = softmax(z0), softmax(z1)
        kl = float(np.mean(np.sum(p0 * (np.log(p0 + 1e-12) - np.log(p1 + 1e-12)), 1)))
        print(f"{path}: clean {100 * c0.mean():.1f} -> {100 * c1.mean():.1f}; on the original's PGD-10 examples "
              f"acc {100 * (z0.argmax(1) == y).mean():.1f} -> {100 * (z1.argmax(1) == y).mean():.1f}, "
              f"disagreement {100 * (z0.argmax(1) != z1.argmax(1)).mean():.1f}%, "
              f"relative logit error {np.linalg.norm(z1 - z0) / np.linalg.norm(z0):.4f}, KL {kl:.4f}", flush=True)


if __name__ == "__main__":
    main()
