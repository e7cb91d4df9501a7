"""A fine-tune's checkpoint: everything its loop needs to go on exactly where it stopped.

Written atomically every `checkpoint_every` steps (`save`), read back by a resumed run (`load`):
the trained values, the optimizer and schedule state, both random generators, the epoch order and
position in it, and the running counts and losses. A resumed run therefore ends with the same
weights as an uninterrupted one (deterministic for a seed and a thread count). The checkpoint
records what it belongs to (the model's hash and the options that change the result), and
`load` refuses one from other settings, naming the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gdws_onnx.errors import GDWSError, literal
from gdws_onnx.files import atomic_write

FORMAT = 1
# options that do not change the weights a run ends with: a resumed run may change them
FREE_OPTIONS = ("threads", "allow_worse", "checkpoint", "checkpoint_every", "resume", "eval_steps")


@dataclass
class LoopState:
    """Where the training loop is: after `step` steps, at `pos` in the epoch `order`."""

    step: int
    order: np.ndarray
    pos: int
    correct: int
    seen: int
    losses: list[float]
    rng: dict  # numpy Generator.bit_generator.state
    torch_gen: object  # torch.Generator.get_state() (a ByteTensor)
    values: dict  # parameter name -> tensor
    optimizer: dict
    schedule: dict


def identity(model_sha256: str, options: dict) -> dict:
    """What a checkpoint belongs to: the model and the options that change the result."""
    return {"format": FORMAT, "model_sha256": model_sha256,
            "options": {k: v for k, v in options.items() if k not in FREE_OPTIONS}}


def save(path: str, ident: dict, state: LoopState) -> None:
    """Write the checkpoint atomically (`files.atomic_write`)."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save({"identity": ident, "state": state.__dict__}, f)


def load(path: str, ident: dict) -> LoopState:
    """The loop state of the checkpoint at `path`; GDWSError when it cannot be read or belongs
    to another model or other settings (the message names them)."""
    import torch

    try:
        blob = torch.load(path, weights_only=False)
        theirs, state = blob["identity"], blob["state"]
    except Exception as e:  # noqa: BLE001 (a corrupt or foreign file: one clear message)
        raise GDWSError(f"cannot read the checkpoint {literal(path)}: {literal(e)}") from None
    if theirs.get("format") != FORMAT:
        raise GDWSError(f"the checkpoint {literal(path)} was written by another version; delete it to start over")
    if theirs["model_sha256"] != ident["model_sha256"]:
        raise GDWSError(f"the checkpoint {literal(path)} belongs to another model; delete it to start over")
    diff = sorted(k for k in set(theirs["options"]) | set(ident["options"])
                  if theirs["options"].get(k) != ident["options"].get(k))
    if diff:
        shown = ", ".join(f"{k} {theirs['options'].get(k)!r} -> {ident['options'].get(k)!r}" for k in diff)
        raise GDWSError(f"the checkpoint {literal(path)} is from other settings ({literal(shown)}); resume with "
                        "the same settings, or delete it to start over")
    return LoopState(**state)
