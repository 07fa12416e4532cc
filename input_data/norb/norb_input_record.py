"""Reader of the reference's smallNORB records, `{split}duo.tfrecords`.

Features: height=96, width=96, depth=2, label (0..4), meta (instance, elevation, azimuth,
lighting) and image_raw (the two 96x96 views, depth-major); `python -m
input_data.norb.convert` writes them from the NYU files. As the reference reads them (its
defaults height=48, distort=True): both views resized to 48x48 (TF1 bilinear), then train:
random brightness +-63, contrast 0.2..1.8 and a random 32x32 crop; test: the central 32x32;
then per-image standardization. With patching (the EM-routing reference's `--patching`),
a test image gives 13 standardized 32x32 crops instead of one (`PATCHES_READER`).
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from capsules import features as keys
from input_data.builder import Features, Reader
from input_data.norb.nyu import INFO_COLUMNS, NUM_CLASSES, SOURCE_URL
from input_data.norb.nyu import SIZE as SMALLNORB_SIZE
from input_data.norb.nyu import VIEWS as DEPTH
from input_data.records import checked_class, parse_example, require_files

RESIZED = 48
CROPPED = 32
SHUFFLE_BUFFER = 5000
# The official test-time crops (norb_record.inputs with patching), as (y, x) offsets in
# pixels from the centre: the central crop, then extract_glimpse at k * (+-1, +-1) for
# k = 1, 2, 3, in the official order.
GLIMPSE_OFFSETS = ((0, 0),) + tuple(
    (k * dy, k * dx) for k in (1, 2, 3) for dy, dx in ((1, 1), (1, -1), (-1, 1), (-1, -1)))


def record_name(split: str) -> str:
    """The file name of a split's records: `{split}duo.tfrecords`."""
    return f"{split}duo.tfrecords"


def record_files(split: str, data_dir: str) -> list[str]:
    """The record file of a split, checked to exist."""
    path = os.path.join(data_dir, record_name(split))
    require_files([path], "python -m input_data.norb.convert --nyu_dir=DIR "
                          f"--data_dir={data_dir} (DIR: the six NYU files from {SOURCE_URL})")
    return [path]


def decode(filename: tf.Tensor, record: tf.Tensor) -> Features:
    """A record -> {'image': uint8 [96, 96, 2], 'label': int32 [], 'meta': int64 [4]}.

    Every feature the official reader requires must be there, meta included.
    """
    data = parse_example(
        filename, record,
        {"height": SMALLNORB_SIZE, "width": SMALLNORB_SIZE, "depth": DEPTH, "label": None},
        {"image_raw": DEPTH * SMALLNORB_SIZE * SMALLNORB_SIZE}, {"meta": INFO_COLUMNS})
    views = tf.reshape(data["image_raw"], [DEPTH, SMALLNORB_SIZE, SMALLNORB_SIZE])
    return {"image": tf.transpose(views, [1, 2, 0]),
            "label": checked_class(data["label"], NUM_CLASSES, filename, "feature label"),
            "meta": data["meta"]}


def _resized(image: tf.Tensor) -> tf.Tensor:
    """uint8 [96, 96, 2] -> float32 [48, 48, 2] with TF1's bilinear resize."""
    image = tf.cast(image, tf.float32)[tf.newaxis]
    return tf.raw_ops.ResizeBilinear(images=image, size=[RESIZED, RESIZED],
                                     align_corners=False, half_pixel_centers=False)[0]


def _features(image: tf.Tensor, label: tf.Tensor) -> Features:
    image = tf.image.per_image_standardization(image)
    return {keys.IMAGES: image, keys.LABELS: tf.one_hot(label, NUM_CLASSES),
            keys.RECONS_IMAGE: image, keys.RECONS_LABEL: label}


def glimpse_start(offset: int) -> int:
    """Top (or left) row of the official glimpse at `offset` pixels from the centre.

    The official code calls TF1's extract_glimpse (centered=True, normalized=False), whose
    kernel halves such offsets: start = int(offset / 2 + 48 / 2 - 32 / 2). So the official
    +-1, +-2, +-3 shifts move the crop by +0/-1, +-1 and +1/-2 pixels, and the (1, 1)
    glimpse is the central crop again; the published 1.3% error was measured with these
    crops, so they are reproduced as they are.
    """
    return int(offset / 2 + RESIZED / 2 - CROPPED / 2)


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


def crops(image: tf.Tensor) -> tf.Tensor:
    """The official 13 test-time crops: float32 [48, 48, 2] -> [13, 32, 32, 2], unstandardized."""
    return tf.stack([
        image[glimpse_start(dy):glimpse_start(dy) + CROPPED,
              glimpse_start(dx):glimpse_start(dx) + CROPPED]
        for dy, dx in GLIMPSE_OFFSETS])


def parse_eval_patches(data: Features) -> Features:
    """Evaluation features with patching: 'images' float32 [13, 32, 32, 2], each crop
    standardized; 'recons_image' is the central crop, as without patching."""
    features = _features(crops(_resized(data["image"])), data["label"])
    features[keys.RECONS_IMAGE] = features[keys.IMAGES][0]
    return features


READER = Reader(decode=decode, parse_train=parse_train, parse_eval=parse_eval,
                shuffle_buffer=SHUFFLE_BUFFER)
PATCHES_READER = dataclasses.replace(READER, parse_eval=parse_eval_patches)
