"""The one tf.data pipeline every reader shares: read, decode, transform, shuffle, batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from capsules.errors import UsageError
from capsules.tf_data import without_autotune

Features = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Reader:
    """How one data set turns records into model features.

    Attributes:
      decode: (source name, record) -> raw features (uint8 'image' [h, w, c] and int32
        'label' [] or the MultiMNIST equivalents); the source name is used in errors.
      parse_train: (raw features, seed int64 [2]) -> model features, random transforms
        drawn with stateless ops from the per-example seed.
      parse_eval: raw features -> model features, deterministic.
      shuffle_buffer: training shuffle buffer (the reference's min_after_dequeue).
    """

    decode: Callable[[tf.Tensor, tf.Tensor], Features]
    parse_train: Callable[[Features, tf.Tensor], Features]
    parse_eval: Callable[[Features], Features]
    shuffle_buffer: int


def file_records(files: Sequence[str], read: Callable[[tf.Tensor], tf.data.Dataset],
                 is_training: bool, seed: int | None) -> tf.data.Dataset:
    """(file name, record) pairs from `files`, each read with `read`.

    Training shuffles the file order and interleaves the files in parallel; evaluation
    reads the files one after another in the order given.
    """
    def named(name: tf.Tensor) -> tf.data.Dataset:
        return read(name).map(lambda record: (name, record))

    ds = tf.data.Dataset.from_tensor_slices(list(files))
    if not is_training:
        return ds.flat_map(named)
    return ds.shuffle(len(files), seed=seed).interleave(
        named, cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=seed is not None)


def build(reader: Reader, records: tf.data.Dataset, batch_size: int, is_training: bool,
          repeat: bool = False, seed: int | None = None,
          shard: tuple[int, int] | None = None, skip_steps: int = 0) -> tf.data.Dataset:
    """Batches of `reader`'s model features from (source name, record) pairs.

    Training shuffles the examples and gives every example its own random seed, so with
    `seed` set a new pipeline yields the same batches (each new iteration of one pipeline
    is a new epoch: new order, new transforms). Evaluation keeps the order and never drops a
    partial batch. With `repeat` the data repeats forever (in training a remainder batch
    is dropped, so every batch has `batch_size` examples). With `shard` (count, index) only
    batches index, index + count, ... are kept, chosen before decoding (each worker decodes
    its own share); with `seed` set the workers' batches of one step are then the
    consecutive batches, with the same transforms, that one process reads.
    Training with `seed` set skips the examples of the first `skip_steps` steps of that
    stream (before decoding them, so cheaply: batch_size each, times the shard count with
    `shard`): a resumed run continues the stream where it stopped instead of replaying it;
    without a seed every pipeline draws a new stream anyway, and `skip_steps` is ignored.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size}: expected >= 1")
    if skip_steps < 0:
        raise UsageError(f"skip_steps={skip_steps}: expected >= 0")
    autotune = tf.data.AUTOTUNE
    ds = records
    if is_training:
        ds = ds.shuffle(reader.shuffle_buffer, seed=seed)
    if repeat:
        ds = ds.repeat()
    if is_training:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))
        if skip_steps and seed is not None:
            # A step takes one batch of this pipeline, or one of every shard's (`shard` below).
            ds = ds.skip(skip_steps * batch_size * (shard[0] if shard else 1))
    if shard is not None:
        ds = ds.batch(batch_size, drop_remainder=is_training and repeat).shard(*shard).unbatch()
    if is_training:
        ds = ds.map(
            lambda record, pair: reader.parse_train(reader.decode(*record), pair),
            num_parallel_calls=autotune, deterministic=seed is not None)
    else:
        ds = ds.map(lambda name, record: reader.parse_eval(reader.decode(name, record)),
                    num_parallel_calls=autotune, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=is_training and repeat)
    return without_autotune(ds.prefetch(autotune))
