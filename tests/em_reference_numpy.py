"""EM routing written from the paper's equations in NumPy (float64), for the tests.

A general bipartite statement: votes `[batch, children, parents, 16]` with a
mask `[children, parents]` of the pairs that exist (all, for a fully connected
layer; the receptive fields, for a convolution). Variances are summed as
sum_i r_ij (V_ij - mu_j)^2, not as E[V^2] - mu^2 as the package does.
"""

from __future__ import annotations

import numpy as np

from capsules.em_routing import (
    _MASS_EPSILON,
    BETA_A_SCALE,
    BETA_V_SCALE,
    VARIANCE_FLOOR,
)


def em_routing(votes, activations, beta_v, beta_a, num_routing, final_lambda, mask=None,
               mass_scale=1.0):
    """Returns (mu `[batch, parents, 16]`, a `[batch, parents]`, R of the last E-step).

    mass_scale: each parent's mass counts this many times in its cost (a convolution's
    output types: capsules/em_routing.py's s)."""
    votes = np.asarray(votes, np.float64)
    activations = np.asarray(activations, np.float64)
    _, children, parents, _ = votes.shape
    mask = np.ones((children, parents)) if mask is None else np.asarray(mask, np.float64)
    routes = np.broadcast_to(mask / mask.sum(axis=1, keepdims=True), votes.shape[:3])
    for t in range(num_routing):
        inverse_temperature = final_lambda * (1.0 - 0.95 ** (t + 1))
        weights = routes * activations[:, :, None] * mask
        mass = weights.sum(axis=1) + _MASS_EPSILON
        mean = np.einsum("bij,bijh->bjh", weights, votes) / mass[:, :, None]
        deviation = votes - mean[:, None]
        variance = (
            np.einsum("bij,bijh->bjh", weights, deviation**2) / mass[:, :, None] + VARIANCE_FLOOR
        )
        cost = mass_scale * mass * np.sum(
            BETA_V_SCALE * beta_v[None, :, None] + np.log(np.sqrt(variance)), axis=-1
        )
        active = 1.0 / (1.0 + np.exp(-inverse_temperature * (BETA_A_SCALE * beta_a - cost)))
        if t == num_routing - 1:
            return mean, active, routes
        log_density = -0.5 * np.sum(
            np.log(2.0 * np.pi * variance[:, None]) + deviation**2 / variance[:, None], axis=-1
        )
        logits = np.where(mask > 0, np.log(active)[:, None, :] + log_density, -np.inf)
        logits -= logits.max(axis=2, keepdims=True)
        routes = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    raise ValueError("num_routing must be >= 1")


def conv_as_dense(votes, height, width, kernel_size, strides):
    """Convolutional votes `[b, oh, ow, C, k*k*T, 16]` -> dense votes and mask.

    Children are (row, col, t) flattened, parents (oy, ox, c) flattened.
    """
    batch, out_height, out_width, output_dim, kernel_children, _ = votes.shape
    input_dim = kernel_children // (kernel_size * kernel_size)
    children = height * width * input_dim
    parents = out_height * out_width * output_dim
    dense = np.zeros((batch, children, parents, 16))
    mask = np.zeros((children, parents))
    for oy in range(out_height):
        for ox in range(out_width):
            for c in range(output_dim):
                parent = (oy * out_width + ox) * output_dim + c
                for ky in range(kernel_size):
                    for kx in range(kernel_size):
                        for t in range(input_dim):
                            row, col = oy * strides + ky, ox * strides + kx
                            child = (row * width + col) * input_dim + t
                            k = (ky * kernel_size + kx) * input_dim + t
                            dense[:, child, parent] = votes[:, oy, ox, c, k]
                            mask[child, parent] = 1.0
    return dense, mask
