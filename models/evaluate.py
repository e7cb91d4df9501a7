"""Evaluate an exported zoo model: clean accuracy and PGD-20 robust accuracy, decided in ONNX Runtime.

PGD uses the torch model's gradients (the model the ONNX was exported from); every adversarial
example is checked to lie in the eps ball and in [0, 1], then RE-SCORED in onnxruntime on the
exported file, and that score is the reported accuracy.

    python -m models.evaluate --onnx models/vgg_small_fgsm.onnx --arch vgg_small \
        --weights out/checkpoints/vgg_small_fgsm.pt [--n 10000] [--eps 0.1] [--steps 20] \
        [--log models/logs/vgg_small_fgsm.json]   # write the result into the training log
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F


def ort_session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_logits(sess: ort.InferenceSession, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Logits of an ONNX model on x, in batches."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: np.ascontiguousarray(x[i:i + batch], dtype=np.float32)})[0]
            for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
        steps: int, random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD on cross-entropy from x (pixels in [0, 1]); returns x_adv in the ball and [0, 1]."""
    delta = torch.zeros_like(x)
    if random_start:
        delta = ((torch.rand(x.shape, generator=generator) * 2 - 1) * eps).to(x.device)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def evaluate(onnx_path: str, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, eps: float = 0.1,
             steps: int = 20, alpha: float | None = None, batch: int = 500, seed: int = 0) -> dict:
    """Clean and PGD accuracy of the ONNX model (scored in ORT) with PGD from the torch model."""
    alpha = eps / 4 if alpha is None else alpha
    sess = ort_session(onnx_path)
    t0 = time.time()
    clean_logits = ort_logits(sess, x, batch)
    clean_ok = clean_logits.argmax(1) == y
    t_clean = time.time() - t0
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    adv_ok = np.zeros(len(x), dtype=bool)
    torch_adv_ok = np.zeros(len(x), dtype=bool)
    max_dev = 0.0
    t0 = time.time()
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))
        yb = torch.from_numpy(y[i:i + batch])
        xa = pgd(model, xb, yb, eps, alpha, steps, True, gen)
        xa_np = xa.numpy().astype(np.float32)
        dev = float(np.abs(xa_np - x[i:i + batch]).max())
        max_dev = max(max_dev, dev)
        if dev > eps + 1e-6 or xa_np.min() < 0.0 or xa_np.max() > 1.0:
            raise RuntimeError(f"adversarial batch {i} leaves the budget: max |d| {dev}, "
                               f"range [{xa_np.min()}, {xa_np.max()}]")
        with torch.no_grad():
            torch_adv_ok[i:i + batch] = (model(xa).argmax(1) == yb).numpy()
        # the ONNX model decides: an example counts as robust only if ORT still classifies it correctly
        adv_ok[i:i + batch] = (ort_logits(sess, xa_np, batch).argmax(1) == y[i:i + batch]) & clean_ok[i:i + batch]
    t_pgd = time.time() - t0
    return {
        "n": int(len(x)),
        "clean_acc": float(clean_ok.mean()),
        "pgd_acc": float(adv_ok.mean()),
        "pgd_acc_torch": float(torch_adv_ok.mean()),
        "pgd": {"eps": eps, "alpha": alpha, "steps": steps, "random_start": True, "restarts": 1,
                "norm": "Linf", "seed": seed, "gradients": "torch model", "scored_by": "onnxruntime"},
        "max_perturbation": max_dev,
        "wall_clean_s": round(t_clean, 2),
        "wall_pgd_s": round(t_pgd, 2),
    }


def main(argv: list[str] | None = None) -> None:
    from gdws_onnx.data import load_fashion_mnist
    from models.arch import build

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--weights", required=True, help="torch state_dict saved by models.train")
    p.add_argument("--n", type=int, default=None, help="first n test samples (default: all 10k)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log", default=None,
                   help="training log (models/logs/NAME.json) whose `test` entry the result replaces "
                        "(the former entry is kept as `test_previous`)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, _ = build(a.arch)
    state = torch.load(a.weights, map_location="cpu", weights_only=False)
    if "best_state" in state:  # a training checkpoint (models.train --ckpt): the exported epoch's weights
        state = state["best_state"]
    model.load_state_dict(state)
    x, y = load_fashion_mnist("test")
    if a.n:
        x, y = x[:a.n], y[:a.n]
    result = evaluate(a.onnx, model, x, y, a.eps, a.steps, seed=a.seed)
    print(json.dumps(result, indent=2))
    if a.log:
        from pathlib import Path

        log = json.loads(Path(a.log).read_text())
        log["test_previous"], log["test"] = log.get("test"), result
        log["test_command"] = "python -m models.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(a.log).write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
