"""`inputs`: the batched tf.data input of every data set, as the model consumes it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from capsules.datasets import SPLITS, check_name, dataset_info
from capsules.errors import DataReadError, UsageError, error_line
from input_data import builder, tfds_source
from input_data import records as records_lib
from input_data.cifar10 import cifar10_input
from input_data.mnist import mnist_input_record, multimnist, record_names
from input_data.norb import norb_input_record


def inputs(dataset: str, split: str, data_dir: str, batch_size: int,
           num_targets: int | None = None, validate: bool = False, distort: bool = False,
           random_shift: int = 0, repeat: bool = False, seed: int | None = None,
           shard: tuple[int, int] | None = None, num_pairs: int = 1,
           patching: bool = False, skip_steps: int = 0) -> tf.data.Dataset:
    """Batches of feature dicts for training (split='train') or evaluation (split='test').

    Args:
      dataset: 'mnist', 'multimnist', 'cifar10' or 'norb'. 'multimnist' makes the
        MultiMNIST pairs on the fly from the MNIST IDX files (input_data/mnist/multimnist.py):
        an endless stream of new pairs for training, fixed pairs for testing.
      split: 'train' (shuffled, randomly transformed) or 'test' (file order, every example
        exactly once, the last batch kept even if partial).
      data_dir: the directory of the data set's files (for multimnist: of the MNIST IDX
        files); for MultiMNIST records (mnist with num_targets=2) `PREFIX@N` (its N
        shards); for mnist and cifar10 also 'tfds' or 'tfds:DIR' to read them from
        tensorflow-datasets.
      batch_size: examples per batch.
      num_targets: 1, or 2 for MultiMNIST; None: the data set's (2 for multimnist, else 1).
      validate: mnist and multimnist only: train on training images 10,000..60,000
        ('train') and evaluate on training images 0..10,000 ('test').
      distort: single-digit mnist only: train on random 24x24 crops rotated within +-15
        degrees, evaluate on central crops (cifar10 and norb always get their reference
        crops).
      random_shift: single-digit mnist training only: read the unshifted training file and
        shift each image at random within +-random_shift pixels; 0 reads the reference's
        2-shifted file (tensorflow-datasets has no such file, so there 0 means 2).
        Evaluation is never shifted.
      repeat: repeat forever (training loops by step count).
      seed: seed of the shuffles and random transforms (None: nondeterministic); for
        multimnist's test pairs too (None: 0).
      shard: (number of workers, this worker's index) for multi-worker training: this
        worker's share of the batches. With `seed` set (and always for multimnist) by data:
        every worker reads all the records and decodes its batches index, index + count,
        ..., so that the workers' batches of one step are the consecutive batches one
        process reads, whatever the number of workers. Without a seed, by file when there
        are at least as many files as workers (files index, index + count, ...: each worker
        reads only its files), otherwise by data.
      num_pairs: multimnist test only: pairs per test digit (1: 10,000 pairs).
      patching: norb evaluation only: the EM-routing reference's 13 test-time crops of
        each image instead of the central one (images [batch, 13, 32, 32, 2]).
      skip_steps: training with a seed: the steps a resumed run already trained on, whose
        examples are skipped so that it continues its stream rather than replay it (see
        `builder.build`).

    Returns:
      A dataset of dicts, with `info = dataset_info(dataset, num_targets, distort)`:
        images: float32 [batch, info.height, info.width, info.depth]
        labels: float32 [batch, info.num_classes], one-hot (two-hot for MultiMNIST)
        recons_image: float32 like images, the image the decoder reconstructs
        recons_label: int32 [batch], the class of recons_image
        spare_image, spare_label: MultiMNIST only, the second digit and its class.
      With patching, images are [batch, 13, 32, 32, 2], each crop standardized on its own.
    """
    check_name("split", split, SPLITS)
    num_targets = dataset_info(dataset, num_targets, distort).num_targets  # checks them
    if num_pairs != 1 and dataset != "multimnist":
        raise UsageError(f"num_pairs={num_pairs}: only for multimnist")
    if random_shift < 0 or (random_shift and (dataset != "mnist" or num_targets != 1)):
        raise UsageError(f"random_shift={random_shift}: expected 0, or > 0 only for "
                         "single-digit mnist")
    if validate and dataset not in ("mnist", "multimnist"):
        raise UsageError(f"validate=True: {dataset} has no validation split")
    if shard is not None and not 0 <= shard[1] < shard[0]:
        raise ValueError(f"shard={shard}: expected (number of workers, index in 0..number - 1)")
    if patching and (dataset != "norb" or split != "test"):
        raise UsageError(f"patching=True: test-time crops are for norb evaluation only, not "
                         f"{dataset} {split}")
    if dataset == "multimnist":
        return multimnist.inputs(split, data_dir, batch_size, validate, num_pairs, repeat, seed,
                                 shard, skip_steps)
    is_training = split == "train"
    from_tfds = tfds_source.is_tfds(data_dir)
    if from_tfds and num_targets == 2:
        raise UsageError(f"data_dir={data_dir!r}: MultiMNIST is read from PREFIX@N shards")
    shift = 0
    if is_training and dataset == "mnist":
        shift = random_shift or (record_names.TRAIN_SHIFT if from_tfds else 0)
    reader = norb_input_record.PATCHES_READER if patching else _reader(
        dataset, num_targets, distort, shift)
    if from_tfds:
        records = tfds_source.records(dataset, split, data_dir, validate, is_training, seed)
        reader = dataclasses.replace(reader, decode=tfds_source.decode)
    else:
        files, read = _files(dataset, split, data_dir, num_targets, validate, shift)
        if shard is not None and seed is None and len(files) >= shard[0]:
            count, index = shard
            files, shard = files[index::count], None
        records = builder.file_records(files, read, is_training, seed)
    return builder.build(reader, records, batch_size, is_training, repeat, seed, shard,
                         skip_steps)


def _reader(dataset: str, num_targets: int, distort: bool, shift: int) -> builder.Reader:
    if dataset == "mnist":
        return mnist_input_record.reader(num_targets, distort, shift)
    return cifar10_input.READER if dataset == "cifar10" else norb_input_record.READER


def _files(dataset: str, split: str, data_dir: str, num_targets: int, validate: bool,
           shift: int) -> tuple[list[str], Callable[[tf.Tensor], tf.data.Dataset]]:
    """The data set's files for the split and the function that reads records from one."""
    if dataset == "cifar10":
        return cifar10_input.record_files(split, data_dir), cifar10_input.read
    if dataset == "norb":
        files = norb_input_record.record_files(split, data_dir)
    elif num_targets == 2:
        files = mnist_input_record.multi_record_files(data_dir)
    else:
        files = mnist_input_record.record_files(split, data_dir, validate, shift)
    return files, tf.data.TFRecordDataset


def read_error_line(error: BaseException, dataset: str, split: str, data_dir: str,
                    num_targets: int = 1, validate: bool = False, random_shift: int = 0) -> str:
    """One line naming the file behind an error raised while reading `inputs(...)` and
    what is wrong with it (same arguments as `inputs`).

    TensorFlow's errors for a corrupt or truncated record do not name the file: each file
    of the split is read again (records only, not decoded) to find the damaged one.
    """
    if isinstance(error, DataReadError) and error.__cause__ is not None:
        error = error.__cause__
    line = error_line(error)
    if not tfds_source.is_tfds(data_dir) and dataset != "multimnist":  # record files
        shift = random_shift if split == "train" and dataset == "mnist" else 0
        try:
            files, read = _files(dataset, split, data_dir, num_targets, validate, shift)
        except (ValueError, OSError) as missing:
            return str(missing)
        damaged = records_lib.damaged_file(files, read)
        if damaged:
            return damaged
        if any(line.startswith(f"{path}: ") for path in files):  # a record's check failed
            return line
    return f"{data_dir}: {line}"
