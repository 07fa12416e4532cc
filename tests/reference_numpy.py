"""The reference's equations in plain NumPy (float64), written from the paper and layers.py.

Independent of the package: loops and explicit sums, no TensorFlow.
"""

from __future__ import annotations

import numpy as np


def squash(s: np.ndarray) -> np.ndarray:
    """v = |s|^2 / (1 + |s|^2) * s / |s| over the last axis."""
    norm = np.sqrt(np.sum(s * s, axis=-1, keepdims=True))
    return s / norm * norm**2 / (1.0 + norm**2)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def update_routing(votes: np.ndarray, biases: np.ndarray, num_routing: int,
                   leaky: bool) -> np.ndarray:
    """The reference's `_update_routing` (procedure 1 with its biases), in its layouts.

    votes [batch, in, out, atoms] -> [batch, out, atoms], biases [out, atoms];
    votes [batch, in, out, atoms, h, w] -> [batch, out, atoms, h, w], biases
    [out, atoms] or [out, atoms, 1, 1]. Logits [batch, in, out, (h, w)]; every
    iteration updates them, as the reference's loop does.
    """
    votes = votes.astype(np.float64)
    biases = biases.reshape(biases.shape[:2] + (1,) * (votes.ndim - 4))
    logits = np.zeros(votes.shape[:3] + votes.shape[4:])
    for _ in range(num_routing):
        if leaky:
            padded = np.concatenate([np.zeros_like(logits[:, :, :1]), logits], axis=2)
            route = np.moveaxis(softmax(np.moveaxis(padded, 2, -1)), -1, 2)[:, :, 1:]
        else:
            route = np.moveaxis(softmax(np.moveaxis(logits, 2, -1)), -1, 2)
        preactivation = np.sum(route[:, :, :, None] * votes, axis=1) + biases
        activation = np.moveaxis(squash(np.moveaxis(preactivation, 2, -1)), -1, 2)
        logits = logits + np.sum(votes * activation[:, None], axis=3)
    return activation


def routing(votes: np.ndarray, biases: np.ndarray, num_routing: int, leaky: bool) -> np.ndarray:
    """`update_routing` for votes [batch, in, (h, w), out, atoms] -> [batch, (h, w), out, atoms]."""
    spatial = votes.ndim - 4
    in_reference_layout = np.moveaxis(votes, list(range(2, 2 + spatial)),
                                      list(range(4, 4 + spatial)))
    activation = update_routing(in_reference_layout, biases, num_routing, leaky)
    return np.moveaxis(activation, list(range(3, 3 + spatial)), list(range(1, 1 + spatial)))


def margin_costs(labels: np.ndarray, lengths: np.ndarray, margin=0.4, downweight=0.5):
    """The reference's per-class costs [batch, classes], written with explicit cases."""
    out = np.zeros_like(lengths, dtype=np.float64)
    for index in np.ndindex(lengths.shape):
        logit = lengths[index] - 0.5
        if labels[index] == 1:
            out[index] = 0.5 * (logit - margin) ** 2 if logit < margin else 0.0
        else:
            out[index] = downweight * 0.5 * (logit + margin) ** 2 if logit > -margin else 0.0
    return out


def conv2d_nhwc(x: np.ndarray, kernel: np.ndarray, stride: int, padding: str) -> np.ndarray:
    """Cross-correlation as tf.nn.conv2d, x [b, h, w, c], kernel [k, k, c, o]."""
    k = kernel.shape[0]
    b, h, w, c = x.shape
    if padding == "SAME":
        out_h, out_w = -(-h // stride), -(-w // stride)
        pad_h = max((out_h - 1) * stride + k - h, 0)
        pad_w = max((out_w - 1) * stride + k - w, 0)
        x = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                       (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    else:
        out_h, out_w = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.zeros((b, out_h, out_w, kernel.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out


def conv_capsule_votes(inputs: np.ndarray, kernel: np.ndarray, num_capsules: int, atoms: int,
                       stride: int, padding: str) -> np.ndarray:
    """inputs [b, h, w, in, in_atoms] -> votes [b, in, h', w', num_capsules, atoms]."""
    per_type = [conv2d_nhwc(inputs[:, :, :, i], kernel, stride, padding)
                for i in range(inputs.shape[3])]
    votes = np.stack(per_type, axis=1)
    return votes.reshape(votes.shape[:4] + (num_capsules, atoms))


def fc_capsule_votes(inputs: np.ndarray, kernel: np.ndarray, num_capsules: int, atoms: int):
    """The reference's tile-multiply-sum: inputs [b, in, c], kernel [in, c, out*atoms]."""
    tiled = np.repeat(inputs[..., None], kernel.shape[-1], axis=-1)
    votes = np.sum(tiled * kernel, axis=2)
    return votes.reshape(inputs.shape[0], inputs.shape[1], num_capsules, atoms)


def primary_capsules(features: np.ndarray, kernel: np.ndarray, biases: np.ndarray,
                     num_capsules: int, atoms: int, stride: int, padding: str,
                     leaky: bool = False) -> np.ndarray:
    """Reference conv_capsule1 + flattening: [b, num_capsules * h' * w', atoms], type-major."""
    votes = conv_capsule_votes(features[:, :, :, None], kernel, num_capsules, atoms, stride,
                               padding)
    grid = routing(votes, biases, 1, leaky)  # [b, h', w', types, atoms]
    return np.transpose(grid, (0, 3, 1, 2, 4)).reshape(features.shape[0], -1, atoms)


def capsnet_logits(images: np.ndarray, weights: dict, num_prime_capsules: int, padding: str,
                   routing_iterations: int, leaky: bool) -> tuple[np.ndarray, np.ndarray]:
    """CapsNet forward pass: (lengths [b, classes], class capsules [b, classes, 16])."""
    hidden = np.maximum(conv2d_nhwc(images, weights["conv1/kernel"], 1, padding)
                        + weights["conv1/bias"], 0.0)
    primary = primary_capsules(hidden, weights["primary/kernel"], weights["primary/bias"],
                               num_prime_capsules, 8, 2, padding, leaky)
    num_classes = weights["capsule2/bias"].shape[0]
    votes = fc_capsule_votes(primary, weights["capsule2/kernel"], num_classes, 16)
    capsules = routing(votes, weights["capsule2/bias"], routing_iterations, leaky)
    return np.sqrt(np.sum(capsules**2, axis=-1)), capsules
