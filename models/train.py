"""Train a zoo model on Fashion-MNIST, export it to ONNX and measure it in ONNX Runtime.

Recipe (defaults):
  data      Fashion-MNIST train (60k) from /usr/share/datasets/fashion-mnist/, pixels in [0, 1]
            (normalization is inside the model); the last --val samples of a fixed permutation
            are held out as a validation set (never the test set) for checkpoint selection.
  methods   standard : cross-entropy on clean inputs.
            fgsm_rs  : FGSM with random start (Wong, Rice & Kolter 2020): delta ~ U[-eps, eps],
                       one signed-gradient step of size 1.25 * eps, projected to the eps ball and
                       [0, 1]; train on x + delta.
            pgd      : PGD-K (--pgd-steps, step 2.5 * eps / K, random start) adversarial training.
            eps = 0.1 L-inf on [0, 1] pixels, linearly ramped from 0 over --eps-warmup epochs.
  optimizer SGD, momentum 0.9, weight decay 5e-4 (not on BN/bias), batch 128, one-cycle LR
            (linear 0 -> --lr over the first 40% of iterations, then linear to 0).
  checks    each epoch: clean and PGD-10 accuracy on the validation set; a drop of PGD accuracy
            to near zero flags catastrophic overfitting, and the checkpoint with the best
            validation PGD accuracy (robust methods) / clean accuracy (standard) is kept.
  precision --precision bf16 runs forward/backward (attack steps included) under
            torch.autocast("cpu"/"cuda", bfloat16); master weights, optimizer state, evaluation
            and export stay fp32.
  resume    a checkpoint (model, optimizer, RNG, history, best state) is written after every
            epoch to --ckpt; --resume CKPT continues a run that was cut short, bit for bit in
            its schedule (the one-cycle LR is indexed by the global step).
  spectra   after every epoch (and at initialization) the log records, per conv, the fraction
            of weight energy kept by the top 1/2/4 ranks of every input channel's block (the
            raw conv weight, before BatchNorm folding): does training create low-rank structure?
  export    eval mode, torch.onnx.export(dynamo=False), opset 17, dynamic batch axis, constant
            folding (BatchNorm folded into Conv), normalization in the graph, logits output;
            ir_version capped at 10; checked to load in onnxruntime and to match torch (< 1e-4).
  final     on the full 10k test set: clean accuracy in onnxruntime, PGD-20 (eps 0.1, step
            eps/4, random start) with the torch model's gradients, every example checked in
            budget and re-scored in onnxruntime. A JSON log goes to models/logs/NAME.json.

Example:
  python -m models.train --arch vgg_small --method fgsm_rs --epochs 30 --seed 0 \\
      --out models/vgg_small_fgsm.onnx
Smoke test:
  python -m models.train --arch vgg_small --method fgsm_rs --epochs 1 --subset 512 \\
      --limit-batches 3 --eval-n 200 --out /tmp/smoke.onnx --log /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from gdws_onnx.data import load_fashion_mnist
from gdws_onnx.graph.model_io import file_sha256
from models.arch import build
from models.evaluate import evaluate, ort_logits, ort_session, pgd

MAX_IR_VERSION = 10


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def perturb(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, eps: float,
            pgd_steps: int) -> torch.Tensor:
    """Training inputs for one batch (model stays in train mode, as in Wong et al.)."""
    if method == "standard" or eps <= 0:
        return x
    if method == "fgsm_rs":
        delta = (torch.rand_like(x) * 2 - 1) * eps
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)
        return ((x + delta).clamp(0, 1)).detach()
    if method == "pgd":
        return pgd(model, x, y, eps, 2.5 * eps / pgd_steps, pgd_steps, True)
    raise ValueError(f"unknown method {method!r}")


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.0,
             steps: int = 10, batch: int = 500, seed: int = 0) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ok = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if eps > 0:
            xb = pgd(model, xb, yb, eps, eps / 4, steps, True, gen)
        with torch.no_grad():
            ok += int((model(xb).argmax(1) == yb).sum())
    return ok / len(x)


def conv_spectra(model: torch.nn.Module, ranks: tuple[int, ...] = (1, 2, 4)) -> dict[str, list[float]]:
    """Per conv: fraction of ||W||^2 kept by the top-r ranks of each input channel's M x k block."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1):
            w = mod.weight.detach().float().cpu()
            m, c = w.shape[:2]
            s2 = torch.linalg.svdvals(w.reshape(m, c, -1).transpose(0, 1)) ** 2  # c x min(m, k)
            total = float(s2.sum())
            out[name] = [round(float(s2[:, :r].sum()) / total, 4) for r in ranks]
    return out


def lr_at(t: float, lr_max: float) -> float:
    """One-cycle: linear 0 -> lr_max over t in [0, 0.4], then linear to 0 at t = 1."""
    return float(np.interp(t, [0.0, 0.4, 1.0], [0.0, lr_max, 0.0]))


def export_onnx(model: torch.nn.Module, shape: tuple[int, int, int], path: str, opset: int = 17) -> onnx.ModelProto:
    """Eval-mode TorchScript export with dynamic batch, BN folded, ir_version <= 10."""
    model.eval()
    dummy = torch.rand(2, *shape)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (dummy,), path, dynamo=False, opset_version=opset, do_constant_folding=True,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    m = onnx.load(path)
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    m.producer_name = "onnx-gdws models.train"
    m.doc_string = "logits; input: [0,1] pixels, normalization inside the graph"
    onnx.checker.check_model(m)
    bn = [n.name for n in m.graph.node if n.op_type == "BatchNormalization"]
    if bn:
        raise RuntimeError(f"BatchNormalization left unfolded in export: {bn}")
    onnx.save(m, path)
    return m


def check_parity(model: torch.nn.Module, path: str, x: np.ndarray, tol: float = 1e-4) -> float:
    model.eval()
    sess = ort_session(path)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(ort_logits(sess, x) - ref).max())
    if not diff < tol:
        raise RuntimeError(f"ONNX Runtime differs from torch by {diff} (> {tol})")
    return diff


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vgg_small", choices=["vgg_small", "resnet18_small", "vgg16_fmnist"])
    p.add_argument("--method", default="fgsm_rs", choices=["standard", "fgsm_rs", "pgd"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps", type=float, default=0.1, help="L-inf budget on [0,1] pixels (default 0.1)")
    p.add_argument("--eps-warmup", type=float, default=3.0, help="epochs of linear eps ramp (default 3)")
    p.add_argument("--pgd-steps", type=int, default=7, help="steps of PGD training (method pgd)")
    p.add_argument("--lr", type=float, default=0.05, help="peak one-cycle learning rate (default 0.05)")
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--val", type=int, default=1000, help="train samples held out for validation")
    p.add_argument("--subset", type=int, default=None, help="train on the first N samples only (smoke)")
    p.add_argument("--limit-batches", type=int, default=None, help="at most K batches per epoch (smoke)")
    p.add_argument("--eval-n", type=int, default=None, help="final evaluation on the first N test samples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (auto: cuda when available); evaluation runs on CPU")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--log", default=None, help="JSON log (default models/logs/<out stem>.json)")
    p.add_argument("--ckpt", default=None, help="training checkpoint, rewritten every epoch "
                   "(default out/checkpoints/<stem>.pt)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue the run saved in CKPT")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast forward/backward, fp32 weights and export (default fp32)")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    set_seed(a.seed)
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    name = Path(a.out).stem
    log_path = a.log or f"models/logs/{name}.json"
    ckpt_path = a.ckpt or f"out/checkpoints/{name}.pt"
    Path(ckpt_path).parent.mkdir(parents=True, exist_ok=True)
    robust = a.method != "standard"

    x_all, y_all = load_fashion_mnist("train")
    perm = np.random.default_rng(a.seed).permutation(len(x_all))
    val_idx, tr_idx = perm[len(perm) - a.val:], perm[:len(perm) - a.val]
    if a.subset:
        tr_idx = tr_idx[:a.subset]
        val_idx = val_idx[:min(len(val_idx), 200)]
    xtr, ytr = torch.from_numpy(x_all[tr_idx]).to(device), torch.from_numpy(y_all[tr_idx]).to(device)
    xva, yva = torch.from_numpy(x_all[val_idx]).to(device), torch.from_numpy(y_all[val_idx]).to(device)

    model, shape = build(a.arch)
    model.to(device)
    decay, no_decay = [], []
    for n_, prm in model.named_parameters():
        (no_decay if prm.ndim <= 1 else decay).append(prm)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.0, momentum=a.momentum, nesterov=False)
    n_batches = (len(xtr) + a.batch - 1) // a.batch
    if a.limit_batches:
        n_batches = min(n_batches, a.limit_batches)
    total = a.epochs * n_batches
    gen = torch.Generator().manual_seed(a.seed)
    history, best, best_state, best_epoch, start_epoch = [], -1.0, None, 0, 0
    spectra = [{"epoch": 0, "convs": conv_spectra(model)}]
    wall_before = 0.0
    if a.resume:
        ck = torch.load(a.resume, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        history, best, best_state, best_epoch = ck["history"], ck["best"], ck["best_state"], ck["best_epoch"]
        spectra, start_epoch, wall_before = ck["spectra"], ck["epoch"], ck["wall_s"]
        print(f"[train] resumed from {a.resume} after epoch {start_epoch}", flush=True)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if a.precision == "bf16" \
        else contextlib.nullcontext
    print(f"[train] {a.arch} {a.method} eps={a.eps} epochs={a.epochs} train={len(xtr)} val={len(xva)} "
          f"batches/epoch={n_batches} device={device}", flush=True)
    t_start = time.time()
    for ep in range(start_epoch, a.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        t_ep, loss_sum, ok, seen = time.time(), 0.0, 0, 0
        for b in range(n_batches):
            it = ep * n_batches + b
            lr = lr_at((it + 1) / total, a.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            eps = a.eps * min(1.0, (it + 1) / (a.eps_warmup * n_batches)) if a.eps_warmup > 0 else a.eps
            idx = order[b * a.batch:(b + 1) * a.batch].to(device)
            xb, yb = xtr[idx], ytr[idx]
            with autocast():
                xin = perturb(model, xb, yb, a.method, eps, a.pgd_steps)
                out = model(xin)
                loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(yb)
            ok += int((out.argmax(1) == yb).sum())
            seen += len(yb)
        with autocast():  # checkpoint selection only; the reported test numbers are fp32, scored in ORT
            val_clean = accuracy(model, xva, yva)
            val_pgd = accuracy(model, xva, yva, a.eps, 10) if robust else None
        rec = {"epoch": ep + 1, "lr_end": round(lr, 6), "eps_end": round(eps, 5),
               "train_loss": round(loss_sum / seen, 4), "train_acc": round(ok / seen, 4),
               "val_clean": round(val_clean, 4), "val_pgd10": None if val_pgd is None else round(val_pgd, 4),
               "wall_s": round(time.time() - t_ep, 1)}
        history.append(rec)
        print(f"[train] {json.dumps(rec)}", flush=True)
        if robust and ep > 0 and val_pgd is not None and val_pgd < 0.5 * max(h["val_pgd10"] or 0 for h in history[:-1]):
            print("[train] WARNING: validation PGD accuracy collapsed (catastrophic overfitting?)", flush=True)
        score = val_pgd if robust else val_clean
        if score >= best:
            best = score
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_epoch = ep + 1
        spectra.append({"epoch": ep + 1, "convs": conv_spectra(model)})
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "history": history, "best": best,
                    "best_state": best_state, "best_epoch": best_epoch, "spectra": spectra, "epoch": ep + 1,
                    "wall_s": wall_before + time.time() - t_start, "args": vars(a)}, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
    wall_train = wall_before + time.time() - t_start
    model.load_state_dict(best_state)
    model.cpu().eval()
    print(f"[train] done in {wall_train:.0f}s; keeping epoch {best_epoch} (val {'pgd10' if robust else 'clean'} "
          f"{best:.4f}); checkpoint {ckpt_path}", flush=True)

    m = export_onnx(model, shape, a.out)
    x_test, y_test = load_fashion_mnist("test")
    if a.eval_n:
        x_test, y_test = x_test[:a.eval_n], y_test[:a.eval_n]
    parity = check_parity(model, a.out, x_test[:256])
    print(f"[export] {a.out}: ir_version {m.ir_version}, opset 17, max |ORT - torch| = {parity:.2e}", flush=True)
    metrics = evaluate(a.out, model, x_test, y_test, eps=a.eps, steps=20, seed=a.seed)
    print(f"[eval] {json.dumps(metrics)}", flush=True)
    if robust and metrics["pgd_acc"] < 0.2 * metrics["clean_acc"]:
        print("[eval] WARNING: PGD-20 accuracy near zero: catastrophic overfitting", flush=True)

    log = {
        "name": name,
        "file": os.path.basename(a.out),
        "sha256": file_sha256(a.out),
        "architecture": a.arch,
        "dataset": "fashion-mnist",
        "recipe": {"method": a.method, "eps": a.eps, "eps_warmup_epochs": a.eps_warmup,
                   "fgsm_step": 1.25 * a.eps if a.method == "fgsm_rs" else None,
                   "pgd_steps": a.pgd_steps if a.method == "pgd" else None,
                   "epochs": a.epochs, "lr": a.lr, "lr_schedule": "one-cycle linear (peak at 40%)",
                   "wd": a.wd, "momentum": a.momentum, "batch": a.batch, "seed": a.seed,
                   "train_samples": int(len(xtr)), "val_samples": int(len(xva)),
                   "limit_batches": a.limit_batches, "selected_epoch": best_epoch,
                   "precision": a.precision},
        "wall_time_train_s": round(wall_train, 1),
        "threads": a.threads,
        "device": str(device),
        "torch": torch.__version__,
        "host": platform.machine(),
        "export_parity_max_abs": parity,
        "test": metrics,
        "history": history,
        "spectra_per_epoch": spectra,
        "command": "python -m models.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).write_text(json.dumps(log, indent=1) + "\n")
    print(f"[log] {log_path}", flush=True)
    return log


if __name__ == "__main__":
    main()
