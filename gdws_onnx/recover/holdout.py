"""The held-out split a fine-tune is judged on, and the scores of a model on it.

The split is the last `holdout` samples of the training data (never the test split: that stays for
the honest evaluation afterwards). A model's score is its clean accuracy and its accuracy under PGD
(`eval.attacks.pgd`: gradients from the torch replica, every decision taken on ONNX Runtime outputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from gdws_onnx.data import DataError, Dataset, load_dataset
from gdws_onnx.errors import GDWSError, OptionError, literal
from gdws_onnx.eval.gradients.classifier import OrtClassifier
from gdws_onnx.eval.gradients.prepare import input_shape

TEST_SPLITS = ("fashion-mnist:test",)
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX = 1000  # the default split: 10 % of the data, at most this many samples


@dataclass
class HoldoutScore:
    """Clean and PGD accuracy of one model on the held-out split (counts and fractions)."""

    n: int
    clean_correct: int
    robust_correct: int

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / max(1, self.n)

    @property
    def robust_accuracy(self) -> float:
        return self.robust_correct / max(1, self.n)

    def to_dict(self) -> dict:
        return {**asdict(self), "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy}


def load_training_data(spec: str, n: int | None) -> Dataset:
    """The data set `spec` (first `n` samples), labelled and not a test split; OptionError otherwise."""
    try:
        ds = load_dataset(spec, n=n)
    except (DataError, ValueError, OSError) as e:
        raise OptionError(f"cannot load {{0}}: {literal(e)}", "data") from None
    if ds.name.lower() in TEST_SPLITS:
        raise OptionError(f"{{0}} {literal(ds.name)} is a test split: fine-tune on training data "
                          "(e.g. fashion-mnist:train) and keep the test split for evaluation", "data")
    if ds.y is None:
        raise OptionError("{0} has no labels y: the held-out accuracy needs them", "data")
    return ds


def split(ds: Dataset, holdout: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_holdout, y_holdout): the last `holdout` samples are held out (default
    10 %, at most HOLDOUT_MAX, at least 1)."""
    n = len(ds)
    k = min(max(1, int(n * HOLDOUT_FRACTION)), HOLDOUT_MAX) if holdout is None else holdout
    if k < 1 or k >= n:
        raise OptionError(f"{{0}} must be in [1, {n - 1}] for {n} samples", "holdout")
    return ds.x[:n - k], ds.y[:n - k], ds.x[n - k:], ds.y[n - k:]


def check_data_shape(model: onnx.ModelProto, x: np.ndarray, what: str = "the model") -> None:
    """GDWSError unless samples shaped x[0] fit the model's input (its fixed dims)."""
    dims, _ = input_shape(model)
    got = list(x.shape)
    if len(dims) != len(got) or any(isinstance(d, int) and d != g for d, g in zip(dims[1:], got[1:])):
        raise GDWSError(f"the data's samples have shape {got[1:]}; {what}'s input is {dims}")


def score(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, eps: float, steps: int, seed: int,
          threads: int | None, batch_size: int = 128) -> HoldoutScore:
    """Clean and PGD-`steps` (L-inf `eps`) accuracy of `model` on (x, y), judged by ONNX Runtime."""
    from gdws_onnx.eval.attacks import AttackSettings, pgd
    from gdws_onnx.eval.gradients.torch_source import TorchSource

    clf = OrtClassifier(model, threads=threads)
    clean = clf(x).argmax(1) == y
    if steps < 1 or eps == 0:
        robust = clean
    else:
        source = TorchSource(model, batch_size=batch_size, threads=threads)
        robust = pgd(clf, source, x, y, AttackSettings(name="pgd", eps=eps, steps=steps, seed=seed),
                     batch_size=batch_size).robust
    return HoldoutScore(int(len(y)), int(clean.sum()), int(robust.sum()))
