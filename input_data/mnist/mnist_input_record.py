"""Readers of the MNIST and MultiMNIST records written by mnist_shift.py (or the reference).

Single digits: the reference's files, `train_2shifted_mnist.tfrecords` for train and
`test_0shifted_mnist.tfrecords` for test (`..._valid.tfrecords` when validating). With
`random_shift=k > 0` training reads `train_0shifted_mnist.tfrecords` instead and shifts each
image at random within +-k pixels, so the 1.3 GB pre-shifted file is not needed.
MultiMNIST: `data_dir` is `PREFIX@N`, read as its N shards.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from capsules import features as keys
from input_data import transforms
from input_data.builder import Features, Reader
from input_data.mnist.record_names import GENERATOR, TRAIN_SHIFT, record_name
from input_data.records import checked_class, expand_sharded, parse_example, require_files

IMAGE_SIZE = 28
MULTI_SIZE = 36
DISTORTED_SIZE = 24
MAX_ROTATION_DEGREES = 15.0
NUM_CLASSES = 10
SHUFFLE_BUFFER = 5000


def record_files(split: str, data_dir: str, validate: bool, random_shift: int) -> list[str]:
    """The single-digit record file for a split ('train' or 'test'), checked to exist."""
    shift = (0 if random_shift else TRAIN_SHIFT) if split == "train" else 0
    source_split = f"valid_{split}" if validate else split
    path = tf.io.gfile.join(data_dir, record_name(source_split, shift))
    require_files([path], f"{GENERATOR} --data_dir={data_dir} --split={source_split} "
                          f"--shift={shift}")
    return [path]


def multi_record_files(data_dir: str) -> list[str]:
    """The MultiMNIST shards named by `PREFIX@N`, checked to exist."""
    names = expand_sharded(data_dir)
    require_files(names, f"{GENERATOR} --data_dir=DIR --split=SPLIT --multi_targets "
                         f"--shift=4 --pad=4 --num_pairs=NUM --max_shard=NUM")
    return names


def decode(filename: tf.Tensor, record: tf.Tensor) -> Features:
    """A single-digit record -> {'image': uint8 [28, 28, 1], 'label': int32 []}."""
    size = IMAGE_SIZE * IMAGE_SIZE
    data = parse_example(filename, record, {"height": IMAGE_SIZE, "width": IMAGE_SIZE,
                                            "depth": 1, "label": None}, {"image_raw": size})
    return {"image": tf.reshape(data["image_raw"], [IMAGE_SIZE, IMAGE_SIZE, 1]),
            "label": checked_class(data["label"], NUM_CLASSES, filename, "feature label")}


def decode_multi(filename: tf.Tensor, record: tf.Tensor) -> Features:
    """A MultiMNIST record -> uint8 [36, 36, 1] 'image_1', 'image_2', 'merged' and int32
    'label_1', 'label_2'."""
    size = MULTI_SIZE * MULTI_SIZE
    data = parse_example(
        filename, record,
        {"height": MULTI_SIZE, "width": MULTI_SIZE, "depth": 1, "label_1": None,
         "label_2": None},
        {"image_raw_1": size, "image_raw_2": size, "merged_raw": size})
    shape = [MULTI_SIZE, MULTI_SIZE, 1]
    return {
        "image_1": tf.reshape(data["image_raw_1"], shape),
        "image_2": tf.reshape(data["image_raw_2"], shape),
        "merged": tf.reshape(data["merged_raw"], shape),
        "label_1": checked_class(data["label_1"], NUM_CLASSES, filename, "feature label_1"),
        "label_2": checked_class(data["label_2"], NUM_CLASSES, filename, "feature label_2"),
    }


def _to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1] (the reference's / 255)."""
    return tf.cast(image, tf.float32) * (1.0 / 255)


def _single_features(image: tf.Tensor, label: tf.Tensor) -> Features:
    return {keys.IMAGES: image, keys.LABELS: tf.one_hot(label, NUM_CLASSES),
            keys.RECONS_IMAGE: image, keys.RECONS_LABEL: label}


def parse_train(data: Features, seed: tf.Tensor, random_shift: int, distort: bool) -> Features:
    """Training features of a single digit: random shift, then (distort) a random 24x24 crop
    rotated within +-15 degrees. images/recons_image float32 [s, s, 1], labels one-hot."""
    shift_seed, distort_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _to_float(data["image"])
    if random_shift:
        image = transforms.random_shift(image, random_shift, shift_seed)
    if distort:
        image = transforms.random_crop_rotate(image, DISTORTED_SIZE, MAX_ROTATION_DEGREES,
                                              distort_seed)
    return _single_features(image, data["label"])


def parse_eval(data: Features, distort: bool) -> Features:
    """Evaluation features of a single digit: the image, centrally cropped to 24 (distort)."""
    image = _to_float(data["image"])
    if distort:
        image = transforms.central_crop(image, DISTORTED_SIZE)
    return _single_features(image, data["label"])


def parse_multi(data: Features) -> Features:
    """MultiMNIST features: images = the overlay, labels two-hot, recons = the first digit,
    spare = the second digit."""
    return {
        keys.IMAGES: _to_float(data["merged"]),
        keys.LABELS: tf.one_hot(data["label_1"], NUM_CLASSES)
        + tf.one_hot(data["label_2"], NUM_CLASSES),
        keys.RECONS_IMAGE: _to_float(data["image_1"]),
        keys.RECONS_LABEL: data["label_1"],
        keys.SPARE_IMAGE: _to_float(data["image_2"]),
        keys.SPARE_LABEL: data["label_2"],
    }


def reader(num_targets: int, distort: bool, random_shift: int) -> Reader:
    """The MNIST (num_targets=1) or MultiMNIST (num_targets=2) Reader."""
    if num_targets == 2:
        return Reader(decode=decode_multi, parse_train=lambda data, seed: parse_multi(data),
                      parse_eval=parse_multi, shuffle_buffer=SHUFFLE_BUFFER)
    return Reader(
        decode=decode,
        parse_train=functools.partial(parse_train, random_shift=random_shift,
                                      distort=distort),
        parse_eval=functools.partial(parse_eval, distort=distort),
        shuffle_buffer=SHUFFLE_BUFFER)
