"""tensorflow-datasets as an optional source of MNIST and CIFAR10: data_dir 'tfds[:DIR]'.

The examples come decoded ('image' uint8 [h, w, c], 'label' int64) from tfds's own files
(downloaded into DIR, or tfds's default directory); the data sets' usual transforms apply.
"""

from __future__ import annotations

import tensorflow as tf

from capsules.errors import UsageError
from input_data.builder import Features

PREFIX = "tfds"
DATASETS = ("mnist", "cifar10")
# (split, validate) -> tfds split; validation holds out the first 10,000 training images.
SPLITS = {("train", False): "train", ("test", False): "test",
          ("train", True): "train[10000:]", ("test", True): "train[:10000]"}


def is_tfds(data_dir: str) -> bool:
    """Whether `data_dir` names tensorflow-datasets ('tfds' or 'tfds:DIR')."""
    return data_dir == PREFIX or data_dir.startswith(PREFIX + ":")


def records(dataset: str, split: str, data_dir: str, validate: bool, is_training: bool,
            seed: int | None) -> tf.data.Dataset:
    """(source name, example dict) pairs of a split from tensorflow-datasets."""
    if dataset not in DATASETS:
        raise UsageError(f"data_dir={data_dir!r}: tensorflow-datasets serves only "
                         f"{', '.join(DATASETS)}, not {dataset}")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"data_dir={data_dir!r} needs tensorflow-datasets: "
                          "pip install tensorflow-datasets") from e
    tfds_split = SPLITS[(split, validate)]
    ds = tfds.load(dataset, split=tfds_split, data_dir=data_dir[len(PREFIX) + 1:] or None,
                   shuffle_files=is_training, read_config=tfds.ReadConfig(shuffle_seed=seed))
    name = f"{PREFIX}:{dataset}/{tfds_split}"
    return ds.map(lambda example: (name, example))


def decode(name: tf.Tensor, example: Features) -> Features:
    """A tfds example -> {'image': uint8 [h, w, c], 'label': int32 []}."""
    del name
    return {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}
