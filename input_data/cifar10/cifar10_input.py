"""Reader of CIFAR10's binary version (https://www.cs.toronto.edu/~kriz/cifar.html).

Files: `data_dir/cifar-10-batches-bin/data_batch_{1..5}.bin` (train) and `test_batch.bin`
(test). Each record is 3073 bytes: the label, then the 32x32x3 image depth-major.
Train: random 24x24 crop, left-right flip, brightness +-63, contrast 0.2..1.8; test: the
central 24x24; then per-image standardization, as the reference does.
"""

from __future__ import annotations

import functools
import os

import tensorflow as tf

from capsules import features as keys
from capsules.errors import UsageError
from input_data.builder import Features, Reader
from input_data.records import checked_class, require_files

IMAGE_SIZE = 32
DEPTH = 3
CROPPED_SIZE = 24
NUM_CLASSES = 10
RECORD_BYTES = 1 + IMAGE_SIZE * IMAGE_SIZE * DEPTH
SHUFFLE_BUFFER = 10000
FOLDER = "cifar-10-batches-bin"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def record_files(split: str, data_dir: str) -> list[str]:
    """The binary files of a split, checked to exist and to hold whole records."""
    names = ([f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train"
             else ["test_batch.bin"])
    files = [os.path.join(data_dir, FOLDER, name) for name in names]
    require_files(files, f"mkdir -p {data_dir} && curl -L {URL} | tar -xz -C {data_dir}")
    for path in files:
        size = tf.io.gfile.stat(path).length
        if size % RECORD_BYTES:
            raise UsageError(f"{path}: {size} bytes is not a multiple of the "
                             f"{RECORD_BYTES}-byte CIFAR10 record")
    return files


read = functools.partial(tf.data.FixedLengthRecordDataset, record_bytes=RECORD_BYTES)


def decode(filename: tf.Tensor, record: tf.Tensor) -> Features:
    """A 3073-byte record -> {'image': uint8 [32, 32, 3], 'label': int32 []}."""
    data = tf.io.decode_raw(record, tf.uint8)
    image = tf.transpose(tf.reshape(data[1:], [DEPTH, IMAGE_SIZE, IMAGE_SIZE]), [1, 2, 0])
    return {"image": image,
            "label": checked_class(data[0], NUM_CLASSES, filename, "label byte")}


def _features(image: tf.Tensor, label: tf.Tensor) -> Features:
    image = tf.image.per_image_standardization(image)
    return {keys.IMAGES: image, keys.LABELS: tf.one_hot(label, NUM_CLASSES),
            keys.RECONS_IMAGE: image, keys.RECONS_LABEL: label}


def parse_train(data: Features, seed: tf.Tensor) -> Features:
    """Training features: float32 [24, 24, 3] random crop, flip, brightness and contrast,
    standardized; labels one-hot [10]."""
    crop, flip, brightness, contrast = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    image = tf.cast(data["image"], tf.float32)
    image = tf.image.stateless_random_crop(image, [CROPPED_SIZE, CROPPED_SIZE, DEPTH], crop)
    image = tf.image.stateless_random_flip_left_right(image, flip)
    image = tf.image.stateless_random_brightness(image, 63, brightness)
    image = tf.image.stateless_random_contrast(image, 0.2, 1.8, contrast)
    return _features(image, data["label"])


def parse_eval(data: Features) -> Features:
    """Evaluation features: the central [24, 24, 3] crop, standardized."""
    image = tf.cast(data["image"], tf.float32)
    return _features(tf.image.resize_with_crop_or_pad(image, CROPPED_SIZE, CROPPED_SIZE),
                     data["label"])


READER = Reader(decode=decode, parse_train=parse_train, parse_eval=parse_eval,
                shuffle_buffer=SHUFFLE_BUFFER)
