"""Losses and accuracy counts of the reference's `layers.evaluate` and `reconstruction`."""

from __future__ import annotations

import tensorflow as tf

from capsules import ops

# The reference's balance_factor: reconstruction error is downweighted so that
# it does not dominate the margin loss during training.
RECONSTRUCTION_WEIGHT = 0.0005


def _batch_mean(per_example: tf.Tensor, sample_weight: tf.Tensor | None) -> tf.Tensor:
    """Mean over the batch of `[batch]` values, each times its weight if any.

    As Keras' default reduction ("sum_over_batch_size"): divided by the batch size,
    not by the sum of the weights, so weights of 1 give the unweighted mean.
    """
    if sample_weight is not None:
        per_example *= tf.cast(sample_weight, per_example.dtype)
    return tf.reduce_mean(per_example)


def classification_loss(
    labels: tf.Tensor, logits: tf.Tensor, loss_type: str = "margin", loss_form: str = "reference",
    sample_weight: tf.Tensor | None = None,
) -> tf.Tensor:
    """Scalar classification loss of the reference's `evaluate`.

    labels: `[batch, num_classes]` one-hot or k-hot; logits: `[batch, num_classes]`;
    sample_weight: optional `[batch]` weights of the per-example losses (see `_batch_mean`).
    loss_type:
      'margin': margin costs (`ops.margin_loss`) averaged over batch and classes, as
        the reference does (loss_form='reference'); loss_form='paper' gives eq. 4 of
        the paper instead: summed over classes, without the reference's factor 0.5,
        averaged over the batch.
      'softmax': softmax cross entropy, averaged over the batch.
      'sigmoid': sigmoid cross entropy against labels / 2 (two targets), averaged
        over batch and classes.
    """
    labels = tf.cast(labels, logits.dtype)
    if loss_type == "margin":
        costs = ops.margin_loss(labels, logits)
        if loss_form == "paper":
            per_example = tf.reduce_sum(2.0 * costs, axis=-1)
        else:  # the batch mean of the class means is the mean over batch and classes
            per_example = tf.reduce_mean(costs, axis=-1)
    elif loss_type == "softmax":
        per_example = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    elif loss_type == "sigmoid":
        per_example = tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=labels / 2.0, logits=logits), axis=-1
        )
    else:
        raise ValueError(f"loss_type must be margin, softmax or sigmoid, got {loss_type!r}")
    return _batch_mean(per_example, sample_weight)


def reconstruction_loss(
    reconstruction: tf.Tensor, target: tf.Tensor, sample_weight: tf.Tensor | None = None
) -> tf.Tensor:
    """0.0005 x per-image sum of squared pixel errors, averaged over the batch (the reference's).

    reconstruction, target: `[batch, num_pixels]`; sample_weight: optional `[batch]`
    weights of the per-image errors (see `_batch_mean`).
    """
    squared_error = tf.reduce_sum(tf.square(reconstruction - target), axis=-1)
    return RECONSTRUCTION_WEIGHT * _batch_mean(squared_error, sample_weight)


def count_found_targets(labels: tf.Tensor, logits: tf.Tensor, num_targets: int) -> tf.Tensor:
    """How many of the `num_targets` labelled classes are among the top `num_targets` logits.

    Returns int32 `[batch]`. The reference's 'correct' is found == num_targets and
    'almost' (at least one found) is found >= 1.
    """
    targets = tf.math.top_k(labels, k=num_targets).indices
    predictions = tf.math.top_k(logits, k=num_targets).indices
    found = tf.reduce_any(tf.equal(targets[:, :, None], predictions[:, None, :]), axis=-1)
    return tf.reduce_sum(tf.cast(found, tf.int32), axis=-1)


def spread_loss(labels: tf.Tensor, activations: tf.Tensor, margin,
                sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    """Spread loss of matrix capsules (Hinton et al. 2018, eq. 3), as the official code averages it.

    For every labelled class t and every other class i:
        L = sum_t sum_(i not labelled) max(0, margin - (a_t - a_i))^2,
    averaged over the batch and divided by num_classes (the official `reduce_mean`
    over batch x classes; for one target, the paper's sum over i / num_classes).
    labels: `[batch, num_classes]` one-hot or k-hot; activations: same shape;
    sample_weight: optional `[batch]` weights of the per-image losses (see `_batch_mean`).
    """
    labels = tf.cast(labels, activations.dtype)
    margin = tf.cast(margin, activations.dtype)
    # gaps[b, t, i] = margin - (a_t - a_i), counted where t is labelled and i is not.
    gaps = margin - (activations[:, :, None] - activations[:, None, :])
    pairs = labels[:, :, None] * (1.0 - labels[:, None, :])
    per_image = tf.reduce_sum(pairs * tf.square(tf.nn.relu(gaps)), axis=[1, 2])
    num_classes = tf.cast(tf.shape(labels)[1], activations.dtype)
    return _batch_mean(per_image / num_classes, sample_weight)
