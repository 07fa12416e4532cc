"""Reader of the reference's smallNORB records, `{split}duo.tfrecords`.

Features: height=96, width=96, depth=2, label (0..4), meta (4 ints, unused here) and
image_raw (the two 96x96 views, depth-major). As the reference reads them (its defaults
height=48, distort=True): both views resized to 48x48 (TF1 bilinear), then train: random
brightness +-63, contrast 0.2..1.8 and a random 32x32 crop; test: the central 32x32; then
per-image standardization.
"""

from __future__ import annotations

import os

import tensorflow as tf

from capsules import features as keys
from input_data.builder import Features, Reader
from input_data.records import checked_class, parse_example, require_files

SMALLNORB_SIZE = 96
DEPTH = 2
RESIZED = 48
CROPPED = 32
NUM_CLASSES = 5
SHUFFLE_BUFFER = 5000
SOURCE_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"


def record_files(split: str, data_dir: str) -> list[str]:
    """The record file of a split, checked to exist."""
    path = os.path.join(data_dir, f"{split}duo.tfrecords")
    require_files([path], f"no command in this project: convert smallNORB ({SOURCE_URL}) "
                          "into the reference's record format")
    return [path]


def decode(filename: tf.Tensor, record: tf.Tensor) -> Features:
    """A record -> {'image': uint8 [96, 96, 2], 'label': int32 []}."""
    data = parse_example(
        filename, record,
        {"height": SMALLNORB_SIZE, "width": SMALLNORB_SIZE, "depth": DEPTH, "label": None},
        {"image_raw": DEPTH * SMALLNORB_SIZE * SMALLNORB_SIZE})
    views = tf.reshape(data["image_raw"], [DEPTH, SMALLNORB_SIZE, SMALLNORB_SIZE])
    return {"image": tf.transpose(views, [1, 2, 0]),
            "label": checked_class(data["label"], NUM_CLASSES, filename, "feature label")}


def _resized(image: tf.Tensor) -> tf.Tensor:
    """uint8 [96, 96, 2] -> float32 [48, 48, 2] with TF1's bilinear resize."""
    image = tf.cast(image, tf.float32)[tf.newaxis]
    return tf.raw_ops.ResizeBilinear(images=image, size=[RESIZED, RESIZED],
                                     align_corners=False, half_pixel_centers=False)[0]


def _features(image: tf.Tensor, label: tf.Tensor) -> Features:
    image = tf.image.per_image_standardization(image)
    return {keys.IMAGES: image, keys.LABELS: tf.one_hot(label, NUM_CLASSES),
            keys.RECONS_IMAGE: image, keys.RECONS_LABEL: label}


def parse_train(data: Features, seed: tf.Tensor) -> Features:
    """Training features: float32 [32, 32, 2] after random brightness, contrast and crop."""
    brightness, contrast, crop = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = _resized(data["image"])
    image = tf.image.stateless_random_brightness(image, 63, brightness)
    image = tf.image.stateless_random_contrast(image, 0.2, 1.8, contrast)
    image = tf.image.stateless_random_crop(image, [CROPPED, CROPPED, DEPTH], crop)
    return _features(image, data["label"])


def parse_eval(data: Features) -> Features:
    """Evaluation features: the central float32 [32, 32, 2] crop."""
    image = tf.image.resize_with_crop_or_pad(_resized(data["image"]), CROPPED, CROPPED)
    return _features(image, data["label"])


READER = Reader(decode=decode, parse_train=parse_train, parse_eval=parse_eval,
                shuffle_buffer=SHUFFLE_BUFFER)
