"""Recovery of a rewritten model's accuracy by a short robust fine-tune of its own weights.

  params     which float initializers train (`trainable_names`), the replica's constants as torch
             Parameters (`make_trainable`), and their values written back into the same graph
             (`write_back`, `check_same_graph`: only initializer values may differ)
  adversary  the training attacks (fgsm-rs, pgd-K, none) and losses (cross-entropy; RSLAD-style
             distillation from a teacher's clean soft outputs), in torch
  finetune   `FinetuneOptions`, the loop (`finetune_loaded`, `finetune`), the held-out split, the
             gate (robust accuracy never below the input's) and `FinetuneReport`

The graph is trained through `eval.gradients.TorchReplica` (see ../shared/docs/RECOVERY.md for
why not ONNX Runtime training). Nothing here imports torch at import time, nor click or rich.
"""
