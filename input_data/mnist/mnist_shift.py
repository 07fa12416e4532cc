"""Writes shifted MNIST (single digits) or MultiMNIST (overlaid pairs) as tf.train.Examples.

Reads the raw IDX files in --data_dir and writes into the same directory, as the reference
generator does:

  python input_data/mnist/mnist_shift.py --data_dir=DIR --split=train --shift=2
  python input_data/mnist/mnist_shift.py --data_dir=DIR --split=test --shift=4 --pad=4 \
      --multi_targets --num_pairs=1000 --max_shard=100000

Single digits go to `{split}_{shift}shifted_mnist.tfrecords` (`{train,test}_..._valid` for
the validation splits): for every image all (2*shift+1)^2 copies shifted by (dy, dx), dy from
-shift to shift outside and dx inside, zero fill. Features: height, width, depth, label,
image_raw (uint8, row-major).

MultiMNIST goes to the shards `multi{name}-0000i-of-0000N`: each image is paired with
--num_pairs images of other labels, each digit shifted at random within +-shift after
padding; merged = min(a + b, 255). Every record goes to a random shard with room left (at
most --max_shard records per shard). Features: height, width, depth, label_1, label_2,
image_raw_1, image_raw_2, merged_raw.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

# ruff: noqa: E402 - a command quiets TensorFlow's C++ logs before the imports below load it
from capsules.tf_logs import quiet_tensorflow_logs

if __name__ == "__main__":
    quiet_tensorflow_logs()

import numpy as np
import tensorflow as tf
from absl import app, flags

from capsules.errors import MissingFileError, UsageError
from input_data.mnist import idx
from input_data.mnist.record_names import SPLITS, record_name
from input_data.records import atomic_paths, bytes_feature, int64_feature, progress, shard_names


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's uint8 images [n, 28, 28] and labels [n] from the IDX files in data_dir."""
    files, (start, end) = SPLITS[split]
    for name in files:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            raise MissingFileError(
                f"{path} not found; make it with: python -m input_data.mnist.fetch "
                f"--data_dir={data_dir}"
            )
    images, labels = idx.read_split(data_dir, files)
    if len(images) < (end or start + 1):
        raise UsageError(f"{os.path.join(data_dir, files[0])}: {len(images)} images, too few "
                         f"for split {split} (images {start}..{end or 'end'})")
    return images[start:end], labels[start:end]


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`image` [h, w] moved down by dy and right by dx, zero-filling what comes in."""
    height, width = image.shape
    m = max(abs(dy), abs(dx))
    canvas = np.pad(image, m)
    return canvas[m - dy:m - dy + height, m - dx:m - dx + width]


def shifted_copies(image: np.ndarray, shift: int) -> Iterator[np.ndarray]:
    """The (2*shift+1)^2 shifted copies of `image`, dy outer and dx inner, -shift..shift."""
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            yield shift_image(image, dy, dx)


def single_example(image: np.ndarray, label: int) -> bytes:
    """A serialized single-digit tf.train.Example of a uint8 image [h, w]."""
    height, width = image.shape
    feature = {
        "height": int64_feature(height),
        "width": int64_feature(width),
        "depth": int64_feature(1),
        "label": int64_feature(label),
        "image_raw": bytes_feature(image.tobytes()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def multi_example(base: np.ndarray, top: np.ndarray, base_label: int, top_label: int) -> bytes:
    """A serialized MultiMNIST tf.train.Example of two uint8 images [h, w] and their overlay."""
    height, width = base.shape
    merged = np.minimum(base.astype(np.int32) + top, 255).astype(np.uint8)
    feature = {
        "height": int64_feature(height),
        "width": int64_feature(width),
        "depth": int64_feature(1),
        "label_1": int64_feature(base_label),
        "label_2": int64_feature(top_label),
        "image_raw_1": bytes_feature(base.tobytes()),
        "image_raw_2": bytes_feature(top.tobytes()),
        "merged_raw": bytes_feature(merged.tobytes()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_single(images: np.ndarray, labels: np.ndarray, path: str, shift: int,
                 pad: int) -> int:
    """Writes every padded image's shifted copies to `path`; returns the record count."""
    with atomic_paths([path]) as (temp,), tf.io.TFRecordWriter(temp) as writer:
        for image, label in progress(zip(images, labels, strict=True), len(images), path):
            for copy in shifted_copies(np.pad(image, pad), shift):
                writer.write(single_example(copy, int(label)))
    return len(images) * (2 * shift + 1) ** 2


def pair_plan(labels: np.ndarray, num_pairs: int, shift: int,
              rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The reference's MultiMNIST pairs, image by image: (shifts, partners) of each image.

    shifts: int [num_pairs + 1, 2], (dy, dx) uniform in -shift..shift; row 0 shifts the
      image itself (once, for all its pairs, as the reference does), row j + 1 its j-th
      partner.
    partners: int [num_pairs], distinct indices of images with another label, uniform (the
      reference keeps the first num_pairs of 2 * num_pairs random images with another
      label, which can leave an image with fewer pairs; this draws exactly num_pairs).
    """
    others = {label: np.flatnonzero(labels != label) for label in np.unique(labels)}
    fewest = min(len(indices) for indices in others.values())
    if num_pairs > fewest:
        raise UsageError(f"num_pairs={num_pairs}: some images have only {fewest} partners "
                         "with another label")
    return ((rng.integers(-shift, shift + 1, size=(num_pairs + 1, 2)),
             rng.choice(others[label], num_pairs, replace=False)) for label in labels)


def write_multi(images: np.ndarray, labels: np.ndarray, prefix: str, shift: int, pad: int,
                num_pairs: int, max_shard: int, seed: int | None) -> list[str]:
    """Writes `num_pairs` MultiMNIST records per image into shards; returns their names.

    The pairs are `pair_plan`'s from `np.random.default_rng(seed)`, so
    `input_data.inputs('multimnist', ...)` makes the same test pairs on the fly. Memory
    stays constant in the number of records: pairs and shard turns are drawn image by image
    (shard turns, from their own generator, without replacement from the room left in each
    shard, which has the same distribution as the reference's shuffled list of turns).
    """
    total = len(images) * num_pairs
    capacity = max_shard if max_shard > 0 else total
    names = shard_names(prefix, math.ceil(total / capacity))
    plan = pair_plan(labels, num_pairs, shift, np.random.default_rng(seed))
    shard_rng = np.random.default_rng(None if seed is None else [seed, 1])
    room = np.full(len(names), capacity, np.int64)
    with atomic_paths(names) as temps:
        writers = [tf.io.TFRecordWriter(temp) for temp in temps]
        try:
            for i in progress(range(len(images)), len(images), prefix):
                shifts, partners = next(plan)
                base = shift_image(np.pad(images[i], pad), *shifts[0])
                counts = shard_rng.multivariate_hypergeometric(room, num_pairs)
                room -= counts
                turns = shard_rng.permutation(np.repeat(np.arange(len(names)), counts))
                for partner, (dy, dx), turn in zip(partners, shifts[1:], turns, strict=True):
                    top = shift_image(np.pad(images[partner], pad), dy, dx)
                    writers[turn].write(
                        multi_example(base, top, int(labels[i]), int(labels[partner]))
                    )
        finally:
            for writer in writers:
                writer.close()
    return names


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if f.shift < 0 or f.pad < 0:
        raise app.UsageError("--shift and --pad must be >= 0")
    try:
        images, labels = load_split(f.data_dir, f.split)
    except (ValueError, OSError) as error:  # a missing or damaged IDX file: one line
        print(f"mnist_shift.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    path = os.path.join(f.data_dir, record_name(f.split, f.shift, f.multi_targets))
    if f.multi_targets:
        if f.num_pairs < 1:
            raise app.UsageError("--multi_targets needs --num_pairs >= 1")
        names = write_multi(images, labels, path, f.shift, f.pad, f.num_pairs, f.max_shard,
                            f.seed)
        print(f"wrote {len(images) * f.num_pairs} records to {path}@{len(names)}")
    else:
        count = write_single(images, labels, path, f.shift, f.pad)
        print(f"wrote {count} records to {path}")


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", "/tmp/tensorflow/mnist/input_data",
                        "Directory of the MNIST IDX files; the records are written there.")
    flags.DEFINE_enum("split", "train", list(SPLITS), "The split of MNIST to write.")
    flags.DEFINE_integer("shift", 2, "Maximum shift in pixels along each axis.")
    flags.DEFINE_integer("pad", 0, "Zero padding in pixels on each side.")
    flags.DEFINE_boolean("multi_targets", False, "Write MultiMNIST (overlaid pairs).")
    flags.DEFINE_integer("num_pairs", 0, "MultiMNIST records made from each image.")
    flags.DEFINE_integer("max_shard", 0,
                         "Maximum MultiMNIST records per shard; 0 writes a single shard.")
    flags.DEFINE_integer("seed", 0, "Seed for MultiMNIST's random shifts, pairs and shards.")
    app.run(main)
