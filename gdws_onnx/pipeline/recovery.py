"""`optimize(finetune=EPOCHS, data=SPEC)`: recovery as a pipeline step, after the rewrites and
before INT8. The rewritten model's conv and FC weights are fine-tuned against adversarial examples,
distilling the original (RSLAD-style, `recover.finetune`); the graph is unchanged, only its
initializer values. The step's gate is `finetune`'s: a result whose held-out robust accuracy is
below the rewritten model's is refused (GateFailed, nothing written)."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from gdws_onnx.errors import GateFailed
from gdws_onnx.recover.finetune import FinetuneOptions, FinetuneProgress, finetune_loaded

PROGRESS_EVERY = 0.1  # report fine-tuning progress every tenth of its steps


# the recipe measured best on the paper-width VGG-16 (docs/recovery.md): every conv/FC weight
# trained, at a higher learning rate than the `finetune` command's default
TRAIN, LR = "all", 0.02


def finetune_options(data: str, epochs: float, attack: str, eps: float, seed: int, threads: int | None
                     ) -> FinetuneOptions:
    """The fine-tune of the pipeline: TRAIN and LR, the `finetune` command's other defaults, the
    pipeline's data, seed and threads."""
    return FinetuneOptions(data=data, epochs=epochs, attack=attack, eps=eps, train=TRAIN, lr=LR, seed=seed,
                           threads=threads)


def recover(model: onnx.ModelProto, original: onnx.ModelProto, options: FinetuneOptions,
            progress: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, dict]:
    """(the fine-tuned model, its FinetuneReport as a dict); GateFailed when the fine-tune is
    refused (worse on the held-out split, or ONNX Runtime disagrees with the replica)."""
    last = [0]

    def report_step(p: FinetuneProgress) -> None:
        if progress is not None and (p.step == p.total or p.step - last[0] >= max(1, PROGRESS_EVERY * p.total)):
            last[0] = p.step
            progress(f"finetune step {p.step}/{p.total}: loss {p.loss:.4f}, robust accuracy (train) "
                     f"{100 * p.robust_accuracy:.1f}%")

    result = finetune_loaded(model, options, teacher=original, progress=report_step)
    if not result.report.accepted:
        raise GateFailed(f"finetune refused: {result.report.reason}")
    return result.model, result.report.to_dict()
