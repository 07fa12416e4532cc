"""Plain TensorFlow forms of EM routing and EMCapsNet, differentiated by autodiff.

The oracles of tests/test_em_routing.py and the baseline of benchmarks/em_capsnet.py:
the walkthrough's formulation of the same equations as capsules/em_routing.py, with
k x k patches of poses stacked from strided slices, votes by broadcast matmul
`[..., children, 1, 4, 4] x [children, types, 4, 4]` laid out children before parents,
the EM sums as elementwise products reduced over the children, and autodiff through
the iterations. Each child's normalisation over all its parents uses the package's
segment sums (`capsules.em_routing.ChildGrid`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from capsules import em_routing
from capsules.em_routing import ChildGrid


def _plain_route(votes, child_activations, beta_v, beta_a, num_routing, final_lambda,
                 normalise, mass_scale=1.0, variance_floor=em_routing.VARIANCE_FLOOR):
    """EM iterations on votes `[*groups, children, parents, 16]`, a `[*groups, children, 1]`.

    normalise: logits `[*groups, children, parents]` -> assignment probabilities;
    mass_scale: capsules/em_routing.py's s (output types of a convolution times the
    cost_scale, else the cost_scale).
    """
    routes = normalise(tf.zeros_like(votes[..., 0]))
    for t, inverse_temperature in enumerate(
        em_routing.inverse_temperatures(num_routing, final_lambda)
    ):
        weights = (routes * child_activations)[..., None]
        mass = tf.reduce_sum(weights, axis=-3) + 1e-7
        mean = tf.reduce_sum(weights * votes, axis=-3) / mass
        deviation = votes - mean[..., None, :, :]
        variance = (
            tf.reduce_sum(weights * tf.square(deviation), axis=-3) / mass
            + variance_floor
        )
        cost = mass_scale * mass[..., 0] * tf.reduce_sum(
            em_routing.BETA_V_SCALE * beta_v[:, None] + 0.5 * tf.math.log(variance), axis=-1
        )
        logit = inverse_temperature * (em_routing.BETA_A_SCALE * beta_a - cost)
        if t == num_routing - 1:
            return mean, tf.sigmoid(logit)
        log_density = -0.5 * tf.reduce_sum(
            tf.math.log(2.0 * np.pi * variance[..., None, :, :])
            + tf.square(deviation) / variance[..., None, :, :],
            axis=-1,
        )
        routes = normalise(tf.math.log_sigmoid(logit)[..., None, :] + log_density)
    raise ValueError("num_routing must be >= 1")


def plain_em_routing(votes, activations, beta_v, beta_a, num_routing=3, final_lambda=0.01,
                     variance_floor=em_routing.VARIANCE_FLOOR, cost_scale=1.0):
    """`capsules.ops.em_routing` written straightforwardly.

    votes `[batch, input_dim, output_dim, 16]`, activations `[batch, input_dim]`.
    """
    return _plain_route(
        votes, activations[:, :, None], beta_v, beta_a, num_routing, final_lambda,
        lambda logits: tf.nn.softmax(logits, axis=-1), cost_scale, variance_floor,
    )


def plain_conv_em_routing(votes, activations, beta_v, beta_a, kernel_size, strides,
                          num_routing=3, final_lambda=0.01,
                          variance_floor=em_routing.VARIANCE_FLOOR, cost_scale=1.0):
    """`capsules.ops.conv_em_routing` written straightforwardly.

    votes `[batch, out_height, out_width, k^2 * input_dim, output_dim, 16]` (children
    before parents, as the walkthrough); returns `[batch, out_height, out_width, output_dim,
    16]` and `[batch, out_height, out_width, output_dim]`.
    """
    batch = tf.shape(votes)[0]
    _, out_height, out_width, children, output_dim, _ = votes.shape
    _, height, width, input_dim = activations.shape
    grid = ChildGrid(height, width, input_dim, kernel_size, strides)
    flat = tf.reshape(votes, [batch, out_height * out_width, children, output_dim, 16])

    def normalise(logits):  # [batch, positions, children, parents]
        return tf.transpose(grid.normalise(tf.transpose(logits, [0, 1, 3, 2])), [0, 1, 3, 2])

    child_activations = tf.transpose(grid.child_activations(activations), [0, 1, 3, 2])
    poses, parent_activations = _plain_route(
        flat, child_activations, beta_v, beta_a, num_routing, final_lambda, normalise,
        mass_scale=output_dim * cost_scale, variance_floor=variance_floor,
    )
    return (tf.reshape(poses, [batch, out_height, out_width, output_dim, 16]),
            tf.reshape(parent_activations, [batch, out_height, out_width, output_dim]))


def plain_conv_votes(poses, kernel, kernel_size, strides):
    """Votes `[b, oh, ow, k^2 * T, C, 16]`: patches stacked from strided slices, then matmul."""
    _, height, width, input_dim, _, _ = poses.shape
    out_height = (height - kernel_size) // strides + 1
    out_width = (width - kernel_size) // strides + 1
    patches = tf.stack([
        poses[:, ky:ky + strides * (out_height - 1) + 1:strides,
              kx:kx + strides * (out_width - 1) + 1:strides]
        for ky in range(kernel_size) for kx in range(kernel_size)
    ], axis=3)  # [b, oh, ow, k^2, T, 4, 4]
    children = kernel_size * kernel_size * input_dim
    patches = tf.reshape(patches, [-1, out_height, out_width, children, 1, 4, 4])
    weights = tf.reshape(kernel, [children, kernel.shape[3], 4, 4])
    votes = tf.matmul(patches, weights)
    return tf.reshape(votes, [-1, out_height, out_width, children, kernel.shape[3], 16])


def plain_class_votes(poses, kernel, coordinate_addition):
    """Class votes `[b, h * w * T, classes, 16]`, coordinates added as the package's layer."""
    from capsules.em_layers import _coordinate_offsets

    _, height, width, input_dim, _, _ = poses.shape
    votes = tf.matmul(poses[:, :, :, :, None], kernel)  # [b, h, w, T, classes, 4, 4]
    if coordinate_addition:
        offsets = _coordinate_offsets(height, width).reshape(height, width, 1, 1, 4, 4)
        votes += offsets
    return tf.reshape(votes, [-1, height * width * input_dim, kernel.shape[1], 16])


def plain_logits(model, images):
    """EMCapsNet's class activations computed by the plain formulation, the model's weights."""
    hp = model.hparams
    features = model.conv1(images)
    if model.conv1_norm is not None:
        features = tf.nn.relu(model.conv1_norm(features))
    poses, activations = model.primary_capsules(features)
    for layer in (model.conv_capsules1, model.conv_capsules2):
        votes = plain_conv_votes(poses, layer.kernel, layer.kernel_size, layer.strides)
        poses, activations = plain_conv_em_routing(
            votes, activations, layer.beta_v, layer.beta_a, layer.kernel_size, layer.strides,
            hp.routing, hp.final_lambda, layer.variance_floor, layer.cost_scale,
        )
        poses = tf.reshape(poses, [-1, *poses.shape[1:-1], 4, 4])
    layer = model.class_capsules
    votes = plain_class_votes(poses, layer.kernel, layer.coordinate_addition)
    _, class_activations = plain_em_routing(
        votes, tf.reshape(activations, [-1, votes.shape[1]]), layer.beta_v, layer.beta_a,
        hp.routing, hp.class_final_lambda, layer.variance_floor, layer.cost_scale,
    )
    return class_activations
