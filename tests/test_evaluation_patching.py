"""Test-time crops in evaluation: each crop's scores normalised to sum 1, then summed
(the EM-routing reference's eval_once with --patching), on a model whose scores the test
sets through the pixels it is given."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsules import evaluation


class PixelScores(keras.Model):
    """Scores `[batch, depth]`: the top-left pixel of each image, one class per channel."""

    def call(self, images, training=None):
        return images[:, 0, 0, :]


def crop_batches(scores: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Features whose images [n, crops, 4, 4, classes] make PixelScores return `scores`."""
    images = np.zeros((*scores.shape[:2], 4, 4, scores.shape[2]), np.float32)
    images[:, :, 0, 0, :] = scores
    return tf.data.Dataset.from_tensor_slices(
        {"images": images, "labels": np.eye(scores.shape[2], dtype=np.float32)[labels]}
    ).batch(batch_size)


def test_each_crop_is_normalised_before_the_sum():
    # Central crop sure of class 0; the 12 others mildly for class 1. Normalised, class 1
    # wins (8.1 to 4.9); the raw sums (11.2 to 3.4) and the central crop say class 0.
    scores = np.full((1, 13, 2), [0.1, 0.2])
    scores[0, 0] = [10.0, 1.0]
    combined = evaluation.combine_crop_scores(scores)
    np.testing.assert_allclose(combined, [[10 / 11 + 12 / 3, 1 / 11 + 24 / 3]])
    assert combined.argmax() == 1 and scores.sum(axis=1).argmax() == 0


def test_collect_logits_scores_every_crop_of_every_example():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, (5, 13, 3))
    scores[:, 0] = [5.0, 0.0, 0.0]  # the central crops alone would all say class 0
    labels = scores.argmax(axis=2)[:, 1:].sum(axis=1) % 3
    logits, got_labels = evaluation.collect_logits(PixelScores(), crop_batches(
        scores, labels, batch_size=2), eval_size=4)
    expected = (scores / scores.sum(axis=2, keepdims=True)).sum(axis=1)[:4]
    np.testing.assert_allclose(logits, expected, rtol=1e-6)
    np.testing.assert_array_equal(got_labels.argmax(axis=1), labels[:4])
    assert evaluation.score(logits, got_labels, 1).wrong == int(
        np.sum(expected.argmax(axis=1) != labels[:4]))


def test_negative_logits_are_normalised_by_softmax_and_zero_crops_add_nothing():
    logits = np.array([[[2.0, -1.0], [-3.0, 0.5]]])
    softmax = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    np.testing.assert_allclose(evaluation.combine_crop_scores(logits), softmax.sum(axis=1))
    lengths = np.array([[[0.0, 0.0], [0.2, 0.6]]])
    np.testing.assert_allclose(evaluation.combine_crop_scores(lengths), [[0.25, 0.75]])
    with pytest.raises(ValueError, match=r"shape \(2, 2\): expected \[n, crops, classes\]"):
        evaluation.combine_crop_scores(np.ones((2, 2)))


def test_one_normalisation_serves_all_batches_of_an_evaluation():
    # The first batch's logits are all positive, the second's are not: softmax for both.
    scores = np.array([[[2.0, 1.0], [0.5, 3.0]], [[-1.0, 1.0], [1.0, 2.0]]])
    logits, _ = evaluation.collect_logits(PixelScores(), crop_batches(
        scores, np.array([0, 1]), batch_size=1), eval_size=2)
    softmax = np.exp(scores) / np.exp(scores).sum(axis=2, keepdims=True)
    np.testing.assert_allclose(logits, softmax.sum(axis=1), rtol=1e-6)
