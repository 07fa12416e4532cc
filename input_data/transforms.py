"""Random image transforms drawn with stateless ops from a per-example seed int64 [2]."""

from __future__ import annotations

import math

import tensorflow as tf


def random_shift(image: tf.Tensor, max_shift: int, seed: tf.Tensor) -> tf.Tensor:
    """Shifts `image` [h, w, c] by independent uniform dy, dx in -max_shift..max_shift.

    Zero-fills what comes in, like the reference's shifted records.
    """
    height, width, depth = image.shape
    padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    return tf.image.stateless_random_crop(padded, [height, width, depth], seed)


def rotate(image: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
    """Rotates `image` [h, w, c] counterclockwise by `angle` radians about its centre.

    Nearest-neighbour sampling and zero fill, as tf.contrib.image.rotate did by default.
    """
    height, width = image.shape[0], image.shape[1]
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2
    transform = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])[tf.newaxis]
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis], transforms=transform, output_shape=[height, width],
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")
    return rotated[0]


def random_crop_rotate(image: tf.Tensor, size: int, max_degrees: float,
                       seed: tf.Tensor) -> tf.Tensor:
    """A random `size` x `size` crop of `image` [h, w, c], rotated by up to +-max_degrees."""
    crop_seed, angle_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    cropped = tf.image.stateless_random_crop(image, [size, size, image.shape[2]], crop_seed)
    limit = math.radians(max_degrees)
    angle = tf.random.stateless_uniform([], angle_seed, -limit, limit)
    return rotate(cropped, angle)


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The central `size` x `size` window of `image` [h, w, c]."""
    return tf.image.resize_with_crop_or_pad(image, size, size)
