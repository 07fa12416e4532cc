"""Test fixtures for the reference's TF1 checkpoints: random weights under the reference's
variable names, a tf.compat.v1 Saver that writes them, and a NumPy forward pass of the
reference's models written from its equations (NCHW, as the reference computes)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

v1 = tf.compat.v1


def conv_length(length: int, kernel_size: int, strides: int, padding: str) -> int:
    if padding == "SAME":
        return -(-length // strides)
    return (length - kernel_size) // strides + 1


def _weights(rng: np.random.Generator, shape, stddev: float) -> np.ndarray:
    return (stddev * rng.standard_normal(shape)).astype(np.float32)


def _biases(rng: np.random.Generator, shape) -> np.ndarray:
    # Around the reference's initial 0.1, but different per unit so that a misplaced
    # bias shows.
    return (0.1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def capsnet_weights(rng: np.random.Generator, image_shape, num_prime_capsules: int,
                    padding: str, num_classes: int = 10, remake: bool = True) -> dict:
    """Random variables of the reference's CapsuleModel, by their TF1 names."""
    height, width, depth = image_shape
    rows, cols = (conv_length(conv_length(n, 9, 1, padding), 9, 2, padding)
                  for n in (height, width))
    weights = {
        "conv1/weights": _weights(rng, (9, 9, depth, 256), 0.05),
        "conv1/biases": _biases(rng, (256,)),
        "conv_capsule1/weights": _weights(rng, (9, 9, 256, num_prime_capsules * 8), 0.1),
        "conv_capsule1/biases": _biases(rng, (num_prime_capsules, 8, 1, 1)),
        "capsule2/weights": _weights(
            rng, (num_prime_capsules * rows * cols, 8, num_classes * 16), 0.1),
        "capsule2/biases": _biases(rng, (num_classes, 16)),
    }
    if remake:
        sizes = (num_classes * 16, 512, 1024, height * width * depth)
        for i in range(3):
            weights[f"recons/recons_{i + 1}/weights"] = _weights(rng, sizes[i:i + 2], 0.1)
            weights[f"recons/recons_{i + 1}/biases"] = _biases(rng, (sizes[i + 1],))
    return weights


def baseline_weights(rng: np.random.Generator, image_shape, padding: str,
                     num_classes: int = 10) -> dict:
    """Random variables of the reference's ConvModel, by their TF1 names."""
    height, width, depth = image_shape
    grid = [height, width]
    for _ in range(2):
        grid = [conv_length(conv_length(n, 5, 1, padding), 2, 2, "SAME") for n in grid]
    return {
        "conv1/weights": _weights(rng, (5, 5, depth, 512), 0.05),
        "conv1/biases": _biases(rng, (512,)),
        "conv2/weights": _weights(rng, (5, 5, 512, 256), 0.05),
        "conv2/biases": _biases(rng, (256,)),
        "fc1/weights": _weights(rng, (256 * grid[0] * grid[1], 1024), 0.1),
        "fc1/biases": _biases(rng, (1024,)),
        "softmax_layer/weights": _weights(rng, (1024, num_classes), 0.1),
        "softmax_layer/biases": _biases(rng, (num_classes,)),
    }


def write_tf1_checkpoint(directory, weights: dict, step: int = 1, adam: bool = False,
                         tower: bool = True) -> str:
    """Saves `weights` (TF1 name -> array) as the reference's Saver would; returns the prefix.

    Graph mode, variables made with get_variable in the variable scopes of their names,
    each inside a name scope of its own name first, as the reference's weight and bias
    helpers do. The reference builds its towers in a name scope `tower_0`; without it
    (`tower=False`) the name scope `conv1/weights` exists before the variable, and TF1
    saves the variable as `conv1/weights_1`. With `adam`, also global_step, Adam's slots
    and beta powers, as a training checkpoint of the reference has them.
    """
    by_scope: dict[str, list[str]] = {}
    for name in weights:
        scope, _, leaf = name.rpartition("/")
        by_scope.setdefault(scope, []).append(leaf)
    graph = tf.Graph()
    with graph.as_default():
        loads, assigns, variables = {}, [], []
        with v1.name_scope("tower_0" if tower else None):
            for scope, leaves in by_scope.items():
                with v1.variable_scope(scope):
                    for leaf in leaves:
                        value = weights[f"{scope}/{leaf}"]
                        with v1.name_scope(leaf.split("_")[0]):
                            variable = v1.get_variable(leaf, value.shape, tf.float32,
                                                       initializer=v1.zeros_initializer())
                        placeholder = v1.placeholder(tf.float32, value.shape)
                        loads[placeholder] = value
                        assigns.append(variable.assign(placeholder))
                        variables.append(variable)
        if adam:
            global_step = v1.get_variable("global_step", [], initializer=v1.zeros_initializer(),
                                          trainable=False)
            loss = tf.add_n([tf.reduce_sum(variable) for variable in variables])
            v1.train.AdamOptimizer(1e-3).minimize(loss, global_step=global_step)
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            session.run(assigns, feed_dict=loads)
            return saver.save(session, f"{directory}/model.ckpt", global_step=step)


# -- NumPy forward pass of the reference (float64) ------------------------------------------


def conv2d_nchw(x: np.ndarray, kernel: np.ndarray, strides: int, padding: str) -> np.ndarray:
    """tf.nn.conv2d(data_format='NCHW'): x [n, c, h, w], kernel HWIO [k, k, c, o] ->
    [n, o, out_h, out_w]; SAME pads as TensorFlow (the extra row/column at the end)."""
    size = kernel.shape[0]
    if padding == "SAME":
        pads = []
        for length in x.shape[2:]:
            total = max((conv_length(length, size, strides, "SAME") - 1) * strides + size
                        - length, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, [(0, 0), (0, 0), *pads])
    windows = sliding_window_view(x, (size, size), axis=(2, 3))[:, :, ::strides, ::strides]
    return np.einsum("nchwij,ijco->nohw", windows, kernel, optimize=True)


def max_pool_nchw(x: np.ndarray) -> np.ndarray:
    """2x2 max pooling, stride 2, SAME, on [n, c, h, w]."""
    pads = [(0, length % 2) for length in x.shape[2:]]
    x = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=-np.inf)
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def squash(s: np.ndarray, axis: int) -> np.ndarray:
    """Eq. 1: |s|^2 / (1 + |s|^2) * s / |s|."""
    norm = np.linalg.norm(s, axis=axis, keepdims=True)
    return s / norm * (norm**2 / (1 + norm**2))


def route(votes: np.ndarray, biases: np.ndarray, iterations: int, leaky: bool) -> np.ndarray:
    """Routing by agreement in the reference's layout.

    votes [b, input_dim, output_dim, atoms, *grid], biases broadcastable to
    [output_dim, atoms, *grid]; returns [b, output_dim, atoms, *grid].
    """
    logits = np.zeros(votes.shape[:3] + votes.shape[4:])
    for _ in range(iterations):
        if leaky:
            # An extra zero logit in front takes part of every vote; then it is dropped.
            padded = np.concatenate([np.zeros_like(logits[:, :, :1]), logits], axis=2)
            route_ = np.exp(padded) / np.exp(padded).sum(axis=2, keepdims=True)
            route_ = route_[:, :, 1:]
        else:
            route_ = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
        activation = squash((route_[:, :, :, None] * votes).sum(axis=1) + biases, axis=2)
        logits = logits + (votes * activation[:, None]).sum(axis=3)
    return activation


def capsnet_forward(weights: dict, images: np.ndarray, num_prime_capsules: int, padding: str,
                    leaky: bool, routing: int = 3) -> np.ndarray:
    """Class capsules [b, classes, 16] of the reference CapsuleModel for images [b, h, w, d]."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    x = images.astype(np.float64).transpose(0, 3, 1, 2)  # the reference's NCHW images
    hidden = np.maximum(
        conv2d_nchw(x, w["conv1/weights"], 1, padding) + w["conv1/biases"][:, None, None], 0)
    conv = conv2d_nchw(hidden, w["conv_capsule1/weights"], 2, padding)
    batch, _, rows, cols = conv.shape
    # One input capsule (the conv1 map); output channel = type * 8 + atom.
    votes = conv.reshape(batch, 1, num_prime_capsules, 8, rows, cols)
    primary = route(votes, w["conv_capsule1/biases"], 1, leaky)  # [b, P, 8, rows, cols]
    # (type, row, column) order, atoms last.
    primary = primary.transpose(0, 1, 3, 4, 2).reshape(batch, -1, 8)
    class_votes = np.einsum("bic,ico->bio", primary, w["capsule2/weights"])
    class_votes = class_votes.reshape(batch, primary.shape[1], -1, 16)
    return route(class_votes, w["capsule2/biases"], routing, leaky)


def decoder_forward(weights: dict, capsules: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The reference's reconstruction: masked capsules, flattened -> 512 -> 1024 -> pixels."""
    mask = np.eye(capsules.shape[1])[labels]
    hidden = (capsules * mask[:, :, None]).reshape(len(capsules), -1)
    for i in (1, 2, 3):
        hidden = hidden @ weights[f"recons/recons_{i}/weights"].astype(np.float64)
        hidden = hidden + weights[f"recons/recons_{i}/biases"]
        hidden = np.maximum(hidden, 0) if i < 3 else 1 / (1 + np.exp(-hidden))
    return hidden


def baseline_forward(weights: dict, images: np.ndarray, padding: str) -> np.ndarray:
    """Logits [b, classes] of the reference ConvModel for images [b, h, w, d]."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    hidden = images.astype(np.float64).transpose(0, 3, 1, 2)
    for scope in ("conv1", "conv2"):
        conv = conv2d_nchw(hidden, w[f"{scope}/weights"], 1, padding)
        hidden = max_pool_nchw(np.maximum(conv + w[f"{scope}/biases"][:, None, None], 0))
    hidden = hidden.reshape(len(hidden), -1)  # NCHW flattening
    hidden = np.maximum(hidden @ w["fc1/weights"] + w["fc1/biases"], 0)
    return hidden @ w["softmax_layer/weights"] + w["softmax_layer/biases"]
