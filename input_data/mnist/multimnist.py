"""MultiMNIST made on the fly from the four MNIST IDX files: nothing written to disk.

The pairs follow the reference's `mnist_shift.py --multi_targets --shift=4 --pad=4`: two
digits of different classes, each padded to 36x36 and shifted by dy, dx uniform in -4..4
(zero fill), merged as min(a + b, 255). The batches have the features of the MultiMNIST
records' reader (`mnist_input_record.parse_multi`): the models and the loss see no
difference.

- train: an endless stream (with `repeat`; one pass without) of new pairs. Every pass
  takes each training digit once as the first digit, in a new random order, with a
  partner drawn uniformly from the digits of the other classes and both shifts drawn
  anew: the paper's "each digit paired with 1,000 others" after 1,000 passes, with
  new pairs and shifts on every pass instead of a fixed 60M-record set.
- test: the fixed pairs `mnist_shift.py --split=test --multi_targets --shift=4 --pad=4
  --num_pairs=N --seed=S` writes (`pair_plan` of `np.random.default_rng(seed)`), in
  order: each test digit first, num_pairs times (with one shift), each with its partners.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from capsules.errors import UsageError
from capsules.tf_data import without_autotune
from input_data.builder import Features
from input_data.mnist import mnist_input_record
from input_data.mnist.mnist_shift import load_split, pair_plan

SHIFT = 4
PAD = 4
FRAME = 28 + 2 * PAD


def shift_digits(images: tf.Tensor, shifts: tf.Tensor) -> tf.Tensor:
    """Digits uint8 [n, 28, 28] -> padded to FRAME and shifted: uint8 [n, FRAME, FRAME, 1].

    shifts: int32 [n, 2], (dy, dx) in -SHIFT..SHIFT, down and right; as
    `mnist_shift.shift_image(np.pad(image, PAD), dy, dx)`, by one gather per axis.
    """
    margin = PAD + SHIFT
    padded = tf.pad(images, [[0, 0], [margin, margin], [margin, margin]])
    # out[i, j] = padded[i + SHIFT - dy, j + SHIFT - dx]
    offsets = tf.range(FRAME)[tf.newaxis] + SHIFT - shifts[:, :, tf.newaxis]  # [n, 2, FRAME]
    rows = tf.gather(padded, offsets[:, 0], axis=1, batch_dims=1)
    shifted = tf.gather(rows, offsets[:, 1], axis=2, batch_dims=1)
    return shifted[..., tf.newaxis]


def pair_features(images: tf.Tensor, labels: tf.Tensor, base: tf.Tensor, partner: tf.Tensor,
                  shifts: tf.Tensor) -> Features:
    """The model features of the pairs (images[base], images[partner]), shifted by
    shifts int32 [n, 2, 2] ([:, 0] the base's, [:, 1] the partner's)."""
    label_1, label_2 = tf.gather(labels, base), tf.gather(labels, partner)
    image_1 = shift_digits(tf.gather(images, base), shifts[:, 0])
    image_2 = shift_digits(tf.gather(images, partner), shifts[:, 1])
    merged = tf.cast(tf.minimum(tf.cast(image_1, tf.int32) + tf.cast(image_2, tf.int32), 255),
                     tf.uint8)
    return mnist_input_record.parse_multi({
        "image_1": image_1, "image_2": image_2, "merged": merged,
        "label_1": tf.cast(label_1, tf.int32), "label_2": tf.cast(label_2, tf.int32)})


def random_partners(labels: np.ndarray, base: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """For each index in base int64 [n], a uniformly drawn index of a digit of another class.

    The digits sorted by class make each class's others two runs around its own; a draw
    u in 0..(count of others - 1) skips the own run.
    """
    counts = np.bincount(labels, minlength=10)
    if np.any(counts == len(labels)):
        raise UsageError("MultiMNIST needs digits of at least two classes; all "
                         f"{len(labels)} have class {labels[0]}")
    order = tf.constant(np.argsort(labels, kind="stable"), tf.int64)
    starts = tf.constant(np.cumsum(counts) - counts, tf.int64)
    counts = tf.constant(counts, tf.int64)
    own = tf.gather(labels, base)
    draw = tf.random.stateless_uniform(tf.shape(base), seed, minval=None, maxval=None,
                                       dtype=tf.int64)
    u = tf.math.floormod(draw, len(labels) - tf.gather(counts, own))
    u += tf.where(u >= tf.gather(starts, own), tf.gather(counts, own), 0)
    return tf.gather(order, u)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, repeat: bool,
                  seed: int | None, shard: tuple[int, int] | None = None,
                  skip_steps: int = 0) -> tf.data.Dataset:
    """Batches of new random pairs, each digit once a first digit per pass (see module).

    Every pair is drawn from a seed of its own, as the records' readers draw each example's
    transforms (`builder.build`): with `seed` set the stream of pairs is one stream, however
    it is batched and sharded. With `shard` (count, index) only batches index, index +
    count, ... are kept; with `seed` set the first `skip_steps` steps' pairs are skipped
    (a resumed run continues the stream).
    """
    images_t, labels_t = tf.constant(images), tf.constant(labels)

    def pair(base: tf.Tensor, seed_pair: tf.Tensor) -> Features:
        partner_seed, shift_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed_pair, 2))
        bases = base[tf.newaxis]
        partner = random_partners(labels, bases, partner_seed)
        shifts = tf.random.stateless_uniform([1, 2, 2], shift_seed, minval=-SHIFT,
                                             maxval=SHIFT + 1, dtype=tf.int32)
        features = pair_features(images_t, labels_t, bases, partner, shifts)
        return {name: value[0] for name, value in features.items()}

    ds = tf.data.Dataset.range(len(images)).shuffle(len(images), seed=seed)
    if repeat:
        ds = ds.repeat()
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds))
    if skip_steps and seed is not None:
        ds = ds.skip(skip_steps * batch_size * (shard[0] if shard else 1))
    if shard is not None:  # before the pairs are made: each worker makes its own
        ds = ds.batch(batch_size, drop_remainder=repeat).shard(*shard).unbatch()
    ds = ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None)
    ds = ds.batch(batch_size, drop_remainder=repeat)
    return without_autotune(ds.prefetch(tf.data.AUTOTUNE))


def eval_pairs(labels: np.ndarray, num_pairs: int, seed: int) -> tuple[np.ndarray, ...]:
    """(base int64 [m], partner int64 [m], shifts int32 [m, 2, 2]) of the m = n * num_pairs
    test pairs, base-major: `mnist_shift.write_multi`'s pairs for the same seed."""
    plan = list(pair_plan(labels, num_pairs, SHIFT, np.random.default_rng(seed)))
    partner = np.concatenate([partners for _, partners in plan])
    base = np.repeat(np.arange(len(labels)), num_pairs)
    shifts = np.stack([np.stack([np.broadcast_to(s[0], s[1:].shape), s[1:]], axis=1)
                       for s, _ in plan])
    return base, partner.astype(np.int64), shifts.reshape(-1, 2, 2).astype(np.int32)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, num_pairs: int,
                 repeat: bool, seed: int) -> tf.data.Dataset:
    """Batches of the fixed test pairs (see module), in order, the last batch kept."""
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    ds = tf.data.Dataset.from_tensor_slices(eval_pairs(labels, num_pairs, seed))
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size).map(
        lambda base, partner, shifts: pair_features(images_t, labels_t, base, partner, shifts),
        num_parallel_calls=tf.data.AUTOTUNE)
    return without_autotune(ds.prefetch(tf.data.AUTOTUNE))


def inputs(split: str, data_dir: str, batch_size: int, validate: bool = False,
           num_pairs: int = 1, repeat: bool = False, seed: int | None = None,
           shard: tuple[int, int] | None = None, skip_steps: int = 0) -> tf.data.Dataset:
    """MultiMNIST batches made from the IDX files in `data_dir` (see module and
    `input_data.inputs`); test pairs from `seed`, 0 when None."""
    if num_pairs < 1 or batch_size < 1:
        raise UsageError(f"num_pairs={num_pairs}, batch_size={batch_size}: expected >= 1")
    source = f"valid_{split}" if validate else split
    images, labels = load_split(data_dir, source)
    labels = labels.astype(np.int64)
    if split == "train":
        return train_batches(images, labels, batch_size, repeat, seed, shard, skip_steps)
    return eval_batches(images, labels, batch_size, num_pairs, repeat,
                        0 if seed is None else seed)
