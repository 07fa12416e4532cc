"""Plain TensorFlow forms of the package's fast operations, differentiated by autodiff.

The oracles of tests/test_ops.py and the baselines of benchmarks/capsule_ops.py.
"""

from __future__ import annotations

import tensorflow as tf


def plain_update_routing(votes: tf.Tensor, biases: tf.Tensor, num_routing: int,
                         leaky: bool = False) -> tf.Tensor:
    """Procedure 1 of the paper in plain TensorFlow, to be differentiated by autodiff.

    votes `[batch, (spatial...), output_dim, input_dim, atoms]` (the layout in which the
    layers route), biases `[output_dim, atoms]`; softmax by `tf.nn.softmax`
    over output_dim (leaky: with a zero logit in front, dropped), weighted sums and
    agreements by multiply and reduce_sum, the norm by `tf.norm`.
    """
    logits = tf.zeros_like(votes[..., 0])
    for iteration in range(num_routing):
        if leaky:
            padded = tf.concat([tf.zeros_like(logits[..., :1, :]), logits], axis=-2)
            route = tf.nn.softmax(padded, axis=-2)[..., 1:, :]
        else:
            route = tf.nn.softmax(logits, axis=-2)
        preactivation = tf.reduce_sum(route[..., None] * votes, axis=-2) + biases
        norm = tf.norm(preactivation, axis=-1, keepdims=True)
        activation = preactivation * norm / (1 + norm**2)
        if iteration < num_routing - 1:
            logits += tf.reduce_sum(votes * activation[..., None, :], axis=-1)
    return activation
