"""Evaluation of experiment.py: test error of one model or of an ensemble of trials."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from capsules import features as keys
from capsules.errors import UsageError


@dataclasses.dataclass(frozen=True)
class TestResult:
    """Counts over the evaluated examples, as the reference's `eval_experiment` prints them.

    wrong: examples with a labelled class missing from the top num_targets logits.
    almost_wrong: examples with none of them found (two targets).
    """

    total: int
    wrong: int
    almost_wrong: int

    @property
    def wrong_percent(self) -> float:
        return 100.0 * self.wrong / self.total

    @property
    def accuracy(self) -> float:
        return 1.0 - self.wrong / self.total

    def report(self, num_targets: int) -> str:
        """The reference's line, then the accuracy (and for two targets the 'almost' count)."""
        lines = [
            f"Total wrong predictions: {self.wrong}, wrong percent: {self.wrong_percent:g}%",
            f"Accuracy: {self.accuracy:.4%} ({self.total - self.wrong} of {self.total} correct)",
        ]
        if num_targets == 2:
            lines.append(
                f"Almost wrong predictions (neither digit found): {self.almost_wrong}, "
                f"at least one found: {self.total - self.almost_wrong} of {self.total}"
            )
        return "\n".join(lines)


def collect_logits(
    model: keras.Model, dataset: tf.data.Dataset, eval_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logits `[n, num_classes]` and k-hot labels of the first n = eval_size examples.

    Reads the dataset in order (batch by batch, the last one cut at eval_size), so
    that several models see the same examples; n is smaller if the data ends first.
    """
    predict = tf.function(lambda images: model(images, training=False))
    logits, labels, seen = [], [], 0
    for features in dataset:
        if seen >= eval_size:
            break
        take = min(eval_size - seen, int(features[keys.IMAGES].shape[0]))
        logits.append(predict(features[keys.IMAGES]).numpy()[:take])
        labels.append(features[keys.LABELS].numpy()[:take])
        seen += take
    if not logits:
        raise UsageError("the evaluation data set is empty")
    return np.concatenate(logits), np.concatenate(labels)


def score(logits: np.ndarray, labels: np.ndarray, num_targets: int) -> TestResult:
    """Counts the examples whose labelled classes are (all / none) in the top num_targets."""
    targets = np.argsort(-labels, axis=1, kind="stable")[:, :num_targets]
    predictions = np.argsort(-logits, axis=1, kind="stable")[:, :num_targets]
    found = (targets[:, :, None] == predictions[:, None, :]).any(axis=2).sum(axis=1)
    return TestResult(
        total=len(logits),
        wrong=int(np.sum(found < num_targets)),
        almost_wrong=int(np.sum(found == 0)),
    )


def ensemble_logits(per_trial_logits: list[np.ndarray]) -> np.ndarray:
    """The reference's ensemble: logits summed over the trials."""
    return np.sum(np.stack(per_trial_logits), axis=0)
