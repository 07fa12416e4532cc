"""The raw MNIST IDX files: names, reading and writing (http://yann.lecun.com/exdb/mnist/)."""

from __future__ import annotations

import os
import struct

import numpy as np

IMAGE_SIZE = 28
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049

# (images file, labels file) of each source split.
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
ALL_FILES = TRAIN_FILES + TEST_FILES


def encode_images(images: np.ndarray) -> bytes:
    """IDX bytes of uint8 images [n, 28, 28]."""
    n, height, width = images.shape
    return struct.pack(">4I", IMAGE_MAGIC, n, height, width) + images.astype(np.uint8).tobytes()


def encode_labels(labels: np.ndarray) -> bytes:
    """IDX bytes of uint8 labels [n]."""
    return struct.pack(">2I", LABEL_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes()


def decode(data: bytes, name: str) -> np.ndarray:
    """Decodes IDX bytes into uint8 images [n, 28, 28] or labels [n].

    Raises:
      ValueError: naming `name` if the header or the length is not a uint8 IDX file's.
    """
    if len(data) < 8:
        raise ValueError(f"{name}: {len(data)} bytes, too short for an IDX header")
    magic, n = struct.unpack(">2I", data[:8])
    if magic == LABEL_MAGIC:
        shape, offset = (n,), 8
    elif magic == IMAGE_MAGIC and len(data) >= 16:
        shape, offset = struct.unpack(">3I", data[4:16]), 16
    else:
        raise ValueError(f"{name}: magic {magic}, expected {IMAGE_MAGIC} or {LABEL_MAGIC}")
    expected = offset + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{name}: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


FETCH_COMMAND = "python -m input_data.mnist.fetch --data_dir={}"


def damaged(path: str, problem: str) -> ValueError:
    """The error for a damaged IDX file: what is wrong and how to make it again."""
    return ValueError(f"{problem}: the file is damaged; remove it and run "
                      f"`{FETCH_COMMAND.format(os.path.dirname(path) or '.')}`")


def read(path: str) -> np.ndarray:
    """Reads an IDX file: uint8 images [n, 28, 28] or labels [n].

    Raises:
      ValueError: naming the file, what is wrong and the command that makes it again.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode(data, path)
    except ValueError as error:
        raise damaged(path, str(error)) from None


def read_split(data_dir: str, files: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Reads (images uint8 [n, 28, 28], labels uint8 [n]) from an (images, labels) pair."""
    images, labels = (read(os.path.join(data_dir, name)) for name in files)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{data_dir}: {files[0]} {images.shape} and {files[1]} {labels.shape} do not pair up"
        )
    return images, labels
