"""The pass convention every graph transformation follows (after onnx-ir's passes).

A pass is a small class: `call(model) -> PassResult`. Where it decides per conv site, it has
`check(site) -> str | None`: the reason it does not apply (None: it applies), which is what the
report prints as "skipped: <reason>" (after onnxscript's rewrite rules). A pass edits the model
it is given in place and returns it in the result, with `modified` saying whether anything changed
and `report` holding what the pass has to say (per-layer rows, folded layers, corrections ...).
A pass that cannot edit in place (INT8 quantization writes a new model) says so with the class
attribute `in_place = False` (as onnx-ir's passes do), returns the new model and leaves the one
it was given unchanged. The "site" a `check` takes is a small record of what the decision needs
(`fold.FoldSite`, `peers.PeerSite`, `bias_correction.BiasSite`), so `check` reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx


@dataclass
class PassResult:
    """What a pass did: the (same, edited) model, whether it changed, and its report."""

    model: onnx.ModelProto
    modified: bool
    report: Any = field(default=None)


class GraphPass(Protocol):
    """A graph transformation: `call(model)` edits the model in place and says what it did."""

    def call(self, model: onnx.ModelProto) -> PassResult: ...
