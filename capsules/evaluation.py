"""Evaluation of experiment.py: test error of one model or of an ensemble of trials."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from capsules import features as keys
from capsules.errors import DataReadError, UsageError, error_line


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


def combine_crop_scores(scores: np.ndarray) -> np.ndarray:
    """The EM-routing reference's test-time crop vote (`eval_once` with `--patching`).

    Each crop's class scores are normalised to sum 1, then summed over the crops:
    `combined[i] = sum_k s[i, k] / sum_c s[i, k, c]`; its argmax is the prediction.
    The reference divides by the sum, which fits non-negative scores (capsule lengths,
    EM activations). Departures: when any of `scores` is negative (the baseline's logits,
    where the division can flip a crop's vote), all are normalised by a softmax instead,
    and a crop whose scores are all 0 adds nothing (the reference gets NaN).

    Args:
      scores: float `[n, crops, num_classes]`.

    Returns:
      float64 `[n, num_classes]`.

    Example:
      >>> combine_crop_scores(np.array([[[0.5, 0.5], [0.1, 0.3]]]))
      array([[0.75, 1.25]])
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 3:
        raise ValueError(f"crop scores of shape {scores.shape}: expected [n, crops, classes]")
    if np.any(scores < 0):
        scores = np.exp(scores - scores.max(axis=2, keepdims=True))
    sums = scores.sum(axis=2, keepdims=True)
    shares = np.divide(scores, sums, out=np.zeros_like(scores), where=sums > 0)
    return shares.sum(axis=1)


def collect_logits(
    model: keras.Model, dataset: tf.data.Dataset, eval_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logits `[n, num_classes]` and k-hot labels of the first n = eval_size examples.

    Reads the dataset in order (batch by batch, the last one cut at eval_size), so
    that several models see the same examples; n is smaller if the data ends first.
    Images `[batch, crops, h, w, depth]` (test-time crops, `input_data.inputs(...,
    patching=True)`) are scored crop by crop, each batch of crops the size of a batch of
    images, and the logits are `combine_crop_scores` of all the examples' crop scores
    (one call, so that one normalisation serves every example).
    Raises DataReadError if reading fails part way: no figures from part of a file.
    """
    predict = tf.function(lambda images: model(images, training=False))

    def batch_logits(images: tf.Tensor) -> np.ndarray:
        if images.shape.rank != 5:
            return predict(images).numpy()
        return np.stack([predict(images[:, k]).numpy() for k in range(images.shape[1])],
                        axis=1)

    logits, labels, seen = [], [], 0
    batches = iter(dataset)
    while seen < eval_size:
        try:
            features = next(batches)
        except StopIteration:
            break
        except tf.errors.OpError as error:
            raise DataReadError(error_line(error)) from error
        take = min(eval_size - seen, int(features[keys.IMAGES].shape[0]))
        logits.append(batch_logits(features[keys.IMAGES])[:take])
        labels.append(features[keys.LABELS].numpy()[:take])
        seen += take
    if not logits:
        raise UsageError("the evaluation data set is empty")
    logits = np.concatenate(logits)
    if logits.ndim == 3:
        logits = combine_crop_scores(logits)
    return logits, np.concatenate(labels)


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
