"""The CIFAR10 reader on small binary files in the exact format."""

import numpy as np
import pytest
import tensorflow as tf

import input_data
from input_data.cifar10 import cifar10_input


def standardized(images: np.ndarray) -> np.ndarray:
    """tf.image.per_image_standardization in numpy, per image of [n, h, w, c]."""
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    std = images.std(axis=(1, 2, 3), keepdims=True)
    return (images - mean) / np.maximum(std, 1 / np.sqrt(images[0].size))


def write_batches(data_dir, per_file: int = 2, seed: int = 0) -> dict:
    """data_batch_1..5.bin and test_batch.bin of random records; returns them per split."""
    rng = np.random.default_rng(seed)
    folder = data_dir / cifar10_input.FOLDER
    folder.mkdir()
    out = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        labels = rng.integers(0, 10, per_file, np.uint8)
        depth_major = rng.integers(0, 256, (per_file, 3, 32, 32), np.uint8)
        records = np.concatenate([labels[:, None], depth_major.reshape(per_file, -1)], axis=1)
        (folder / name).write_bytes(records.tobytes())
        split = "test" if name == "test_batch.bin" else "train"
        out[split][0].append(depth_major.transpose(0, 2, 3, 1))
        out[split][1].append(labels)
    return {split: (np.concatenate(x), np.concatenate(y)) for split, (x, y) in out.items()}


def test_eval_is_the_central_crop_standardized(tmp_path):
    data = write_batches(tmp_path, per_file=3)
    batches = list(input_data.inputs("cifar10", "test", str(tmp_path), 2).as_numpy_iterator())
    assert [len(b["labels"]) for b in batches] == [2, 1]
    images = np.concatenate([b["images"] for b in batches])
    expected = standardized(data["test"][0][:, 4:28, 4:28].astype(np.float64))
    np.testing.assert_allclose(images, expected, atol=1e-5)
    labels = np.concatenate([b["recons_label"] for b in batches])
    np.testing.assert_array_equal(labels, data["test"][1])
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]),
                                  np.eye(10)[labels])
    assert input_data.dataset_info("cifar10").height == images.shape[1] == 24


def test_train_reads_all_five_batches_with_random_distortions(tmp_path):
    data = write_batches(tmp_path)
    batches = list(input_data.inputs("cifar10", "train", str(tmp_path), 4,
                                     seed=1).as_numpy_iterator())
    labels = np.concatenate([b["recons_label"] for b in batches])
    assert sorted(labels) == sorted(data["train"][1])
    images = np.concatenate([b["images"] for b in batches])
    assert images.shape == (10, 24, 24, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    again = next(input_data.inputs("cifar10", "train", str(tmp_path), 4,
                                   seed=1).as_numpy_iterator())
    np.testing.assert_array_equal(again["images"], batches[0]["images"])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=(
            "data_batch_1.bin not found; make it with: mkdir -p .* && curl -L "
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz")):
        input_data.inputs("cifar10", "train", str(tmp_path), 4)
    write_batches(tmp_path)
    test_file = tmp_path / cifar10_input.FOLDER / "test_batch.bin"
    test_file.write_bytes(test_file.read_bytes() + b"12345")
    with pytest.raises(ValueError, match="test_batch.bin: 6151 bytes is not a multiple of the "
                                         "3073-byte CIFAR10 record"):
        input_data.inputs("cifar10", "test", str(tmp_path), 4)
    test_file.write_bytes(bytes([10]) + bytes(3072))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="test_batch.bin: label byte is not a class in 0..9"):
        list(input_data.inputs("cifar10", "test", str(tmp_path), 4))
    with pytest.raises(ValueError, match="validate=True: cifar10 has no validation split"):
        input_data.inputs("cifar10", "test", str(tmp_path), 4, validate=True)
    with pytest.raises(ValueError, match="random_shift=2"):
        input_data.inputs("cifar10", "train", str(tmp_path), 4, random_shift=2)
