"""The attacks a fine-tune trains against, and its losses, in torch (imported through the replica).

Attacks (`ATTACK_CHOICES`, parsed by `parse_attack`): "none"; "fgsm-rs" (Wong et al. 2020: one
sign step of 1.25 eps from a uniform start); "pgd-K" (Madry et al. 2018: K sign steps of
2.5 eps / K from a uniform start). Each maximises the training loss of the current weights and
stays inside the L-inf eps-ball and [0, 1].

Losses (`LOSS_CHOICES`): without a teacher, "ce", cross-entropy on the labels of the
adversarial examples (Madry et al.), or "trades" (Zhang et al. 2019): CE(student(x), y) +
TRADES_BETA KL(student(x) || student(x_adv)), whose attack maximises that KL from the student's own
clean prediction. With a teacher (RSLAD, Zi et al. 2021), the teacher's soft outputs on the
*clean* input are the targets: KL(teacher(x) || student(x_adv)), plus 1/6 of the same on the
clean input. The attack maximises the same loss, so no labels are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdws_onnx.errors import OptionError

ATTACK_CHOICES = ("none", "fgsm-rs", "pgd-K")
LOSS_CHOICES = ("ce", "trades")  # with labels; a teacher's soft outputs replace both (RSLAD)
RSLAD_CLEAN_WEIGHT = 1.0 / 6.0  # RSLAD's weights: 5/6 adversarial, 1/6 clean
TRADES_BETA = 6.0  # TRADES's robustness weight (the paper's choice for CIFAR-10 and MNIST-scale eps)


@dataclass(frozen=True)
class TrainAttack:
    """One training attack: kind "none", "fgsm-rs" or "pgd", its steps and eps."""

    kind: str
    steps: int
    eps: float

    @property
    def step_size(self) -> float:
        return 1.25 * self.eps if self.kind == "fgsm-rs" else 2.5 * self.eps / max(1, self.steps)


def parse_attack(spec: str, eps: float) -> TrainAttack:
    """'none', 'fgsm-rs' or 'pgd-K' (K >= 1) at `eps` -> TrainAttack; OptionError otherwise."""
    if not 0 <= eps <= 1:
        raise OptionError("{0} must be in [0, 1]", "eps")
    s = spec.strip().lower()
    if s == "none" or eps == 0:
        return TrainAttack("none", 0, float(eps))
    if s == "fgsm-rs":
        return TrainAttack("fgsm-rs", 1, float(eps))
    if s.startswith("pgd-") and s[4:].isdigit() and int(s[4:]) >= 1:
        return TrainAttack("pgd", int(s[4:]), float(eps))
    raise OptionError(f"{{0}} must be none, fgsm-rs or pgd-K (K steps, e.g. pgd-3), got {spec!r}", "attack")


def loss_fn(torch, logits, y, teacher_probs, reduction: str = "mean"):
    """Cross-entropy on `y`, or KL(teacher_probs || softmax(logits)) per sample summed over classes."""
    F = torch.nn.functional
    if teacher_probs is None:
        return F.cross_entropy(logits, y, reduction=reduction)
    kl = F.kl_div(F.log_softmax(logits, dim=1), teacher_probs, reduction="none").sum(1)
    return kl.mean() if reduction == "mean" else kl.sum()


def clean_targets(replica, x, teacher_probs, loss: str = "ce"):
    """What the attack moves away from: the teacher's soft outputs; under TRADES the student's own
    clean prediction (no gradient); else None (the labels)."""
    if teacher_probs is not None or loss != "trades":
        return teacher_probs
    torch = replica.torch
    with torch.no_grad():
        return torch.softmax(replica(x), dim=1)


def adversarial(replica, attack: TrainAttack, x, y, teacher_probs, generator):
    """Adversarial examples of `x` for the replica's current weights (no weight gradients kept):
    maximising CE on `y`, or KL from `teacher_probs` when given (`clean_targets`)."""
    torch = replica.torch
    if attack.kind == "none":
        return x
    eps = attack.eps
    delta = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps
    xa = (x + delta).clamp(0.0, 1.0)
    for _ in range(attack.steps):
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(torch, replica(xa), y, teacher_probs, reduction="sum")
            (g,) = torch.autograd.grad(loss, xa)
        xa = xa.detach() + attack.step_size * g.sign()
        xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0.0, 1.0)
    return xa.detach()


def training_loss(replica, x, xa, y, teacher_probs, loss: str = "ce"):
    """The loss the weights descend: CE(student(x_adv), y); TRADES's CE(student(x), y) +
    TRADES_BETA KL(student(x) || student(x_adv)); or with a teacher RSLAD's
    5/6 KL(t || student(x_adv)) + 1/6 KL(t || student(x)). Returns (loss, logits on x_adv)."""
    torch = replica.torch
    F = torch.nn.functional
    logits = replica(xa)
    if teacher_probs is None and loss == "trades":
        clean = replica(x)
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return F.cross_entropy(clean, y) + TRADES_BETA * kl, logits
    value = loss_fn(torch, logits, y, teacher_probs)
    if teacher_probs is not None and xa is not x:
        value = (1 - RSLAD_CLEAN_WEIGHT) * value + RSLAD_CLEAN_WEIGHT * loss_fn(torch, replica(x), y, teacher_probs)
    return value, logits
