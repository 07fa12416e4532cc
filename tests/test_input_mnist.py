"""Tiny IDX files -> mnist_shift (single and multi) -> readers, pixel for pixel; the
reference's MNIST records; bad input."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import input_data
from input_data import transforms
from input_data.mnist import idx, mnist_shift
from input_data.mnist.record_names import record_name
from input_data.records import bytes_feature, int64_feature

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "testdata" / "official"
needs_official = pytest.mark.skipif(
    not OFFICIAL.is_dir(), reason=f"reference records not found at {OFFICIAL} (../shared)")


def digits(n: int, size: int = 28, margin: int = 4, seed: int = 0) -> np.ndarray:
    """n random uint8 'digits' [n, size, size] with an empty margin (shifts lose nothing)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), np.uint8)
    images[:, margin:-margin, margin:-margin] = rng.integers(
        0, 256, (n, size - 2 * margin, size - 2 * margin))
    return images


def write_idx(data_dir: Path, train: tuple, test: tuple) -> None:
    for (images, labels), (images_name, labels_name) in ((train, idx.TRAIN_FILES),
                                                         (test, idx.TEST_FILES)):
        (data_dir / images_name).write_bytes(idx.encode_images(images))
        (data_dir / labels_name).write_bytes(idx.encode_labels(labels))


def run_generator(*args: str) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "input_data/mnist/mnist_shift.py", *args], cwd=ROOT,
                   env=env, check=True, capture_output=True)


def parse(record: bytes) -> dict:
    """A serialized Example -> {name: int or uint8 array}."""
    out = {}
    for name, feature in tf.train.Example.FromString(record).features.feature.items():
        if feature.int64_list.value:
            (out[name],) = feature.int64_list.value
        else:
            out[name] = np.frombuffer(feature.bytes_list.value[0], np.uint8)
    return out


def read_records(path) -> list[dict]:
    return [parse(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


def collect(ds: tf.data.Dataset) -> dict:
    """All batches of a finite dataset, concatenated per feature (plus batch sizes)."""
    batches = list(ds.as_numpy_iterator())
    out = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    out["batch_sizes"] = [len(b["labels"]) for b in batches]
    return out


def scaled(images: np.ndarray) -> np.ndarray:
    """uint8 [n, h, w] -> float32 [n, h, w, 1] exactly as the reader scales (x * (1/255))."""
    return images[..., None].astype(np.float32) * np.float32(1.0 / 255)


def find_shift(image: np.ndarray, source: np.ndarray, max_shift: int) -> tuple[int, int]:
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            if np.array_equal(image, mnist_shift.shift_image(source, dy, dx)):
                return dy, dx
    raise AssertionError("not a shifted copy of the source image")


# ---- the generator, single digits --------------------------------------------------------

@pytest.mark.slow
def test_generator_cli_writes_every_shift_in_reference_order(tmp_path):
    train_x, test_x = digits(3), digits(4, seed=1)
    write_idx(tmp_path, (train_x, np.array([5, 0, 4], np.uint8)),
              (test_x, np.array([7, 2, 1, 0], np.uint8)))
    run_generator(f"--data_dir={tmp_path}", "--split=train", "--shift=2")
    records = read_records(tmp_path / "train_2shifted_mnist.tfrecords")
    assert len(records) == 3 * 25
    for n, record in enumerate(records):
        i, k = divmod(n, 25)
        dy, dx = k // 5 - 2, k % 5 - 2
        assert {key: record[key] for key in ("height", "width", "depth", "label")} == {
            "height": 28, "width": 28, "depth": 1, "label": [5, 0, 4][i]}
        np.testing.assert_array_equal(record["image_raw"].reshape(28, 28),
                                      mnist_shift.shift_image(train_x[i], dy, dx))

    # The test split through the reader: file order, every example once, partial batch kept.
    run_generator(f"--data_dir={tmp_path}", "--split=test", "--shift=0")
    out = collect(input_data.inputs("mnist", "test", str(tmp_path), batch_size=3))
    assert out["batch_sizes"] == [3, 1]
    np.testing.assert_array_equal(out["images"], scaled(test_x))
    np.testing.assert_array_equal(out["recons_image"], out["images"])
    np.testing.assert_array_equal(out["recons_label"], [7, 2, 1, 0])
    np.testing.assert_array_equal(out["labels"], np.eye(10, dtype=np.float32)[[7, 2, 1, 0]])
    assert out["images"].dtype == np.float32 and out["recons_label"].dtype == np.int32


def test_shift_with_padding_grows_the_image():
    image = digits(1)[0]
    copies = list(mnist_shift.shifted_copies(np.pad(image, 6), 6))
    assert len(copies) == 169 and copies[0].shape == (40, 40)
    np.testing.assert_array_equal(copies[84][6:34, 6:34], image)  # (dy, dx) = (0, 0)


def test_split_ranges_and_file_names(tmp_path):
    labels = (np.arange(60000) % 10).astype(np.uint8)
    images = np.zeros((60000, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(60000) // 256
    images[:, 0, 1] = np.arange(60000) % 256
    write_idx(tmp_path, (images, labels), (images[:10000], labels[:10000]))

    def first_index(split):
        x, _ = mnist_shift.load_split(str(tmp_path), split)
        return len(x), int(x[0, 0, 0]) * 256 + int(x[0, 0, 1])

    assert first_index("train") == (60000, 0)
    assert first_index("valid_train") == (50000, 10000)
    assert first_index("valid_test") == (10000, 0)
    assert record_name("train", 2) == "train_2shifted_mnist.tfrecords"
    assert record_name("valid_train", 2) == "train_2shifted_mnist_valid.tfrecords"
    assert record_name("valid_test", 0) == "test_0shifted_mnist_valid.tfrecords"
    assert record_name("test", 4, True) == "multitest_4shifted_mnist.tfrecords"


def test_generator_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m input_data.mnist.fetch"):
        mnist_shift.load_split(str(tmp_path), "train")
    write_idx(tmp_path, (digits(3), np.arange(3, dtype=np.uint8)),
              (digits(3), np.arange(3, dtype=np.uint8)))
    with pytest.raises(ValueError, match="3 images, too few for split valid_test"):
        mnist_shift.load_split(str(tmp_path), "valid_test")
    with pytest.raises(ValueError, match="num_pairs=3: some images have only 2 partners"):
        mnist_shift.write_multi(digits(3), np.arange(3), str(tmp_path / "m"), 0, 0, 3, 0, 0)
    assert list(tmp_path.glob("m*")) == []


# ---- readers, single digits -------------------------------------------------------------

@pytest.fixture(scope="module")
def unshifted(tmp_path_factory):
    """train_0shifted / test_0shifted files of 10 digits with labels 0..9."""
    data_dir = tmp_path_factory.mktemp("mnist")
    images, labels = digits(10, seed=2), np.arange(10, dtype=np.uint8)
    for split in ("train", "test"):
        mnist_shift.write_single(images, labels,
                                 str(data_dir / record_name(split, 0)), 0, 0)
    return data_dir, images


def test_random_shift_moves_each_image_within_range(unshifted):
    data_dir, images = unshifted
    ds = input_data.inputs("mnist", "train", str(data_dir), batch_size=5, random_shift=2,
                           repeat=True, seed=7)
    shifts = set()
    for batch in ds.take(12).as_numpy_iterator():
        assert batch["images"].shape == (5, 28, 28, 1)
        for image, label in zip(batch["images"], batch["recons_label"], strict=True):
            pixels = np.rint(image[..., 0] * 255).astype(np.uint8)
            shifts.add(find_shift(pixels, images[label], 2))
    assert len(shifts) > 10  # independent draws, not one shift for all


@pytest.mark.slow
def test_training_is_reproducible_with_a_seed(unshifted):
    data_dir, _ = unshifted

    def first_batches(seed):
        ds = input_data.inputs("mnist", "train", str(data_dir), batch_size=4, random_shift=3,
                               distort=True, repeat=True, seed=seed)
        return [b["images"] for b in ds.take(3).as_numpy_iterator()]

    np.testing.assert_array_equal(first_batches(3), first_batches(3))
    assert not np.array_equal(first_batches(3), first_batches(4))


def test_repeat_gives_full_training_batches_and_eval_never_drops(unshifted):
    data_dir, _ = unshifted
    train = input_data.inputs("mnist", "train", str(data_dir), 4, random_shift=1, repeat=True)
    assert [len(b["labels"]) for b in train.take(6).as_numpy_iterator()] == [4] * 6
    once = collect(input_data.inputs("mnist", "train", str(data_dir), 4, random_shift=1))
    assert once["batch_sizes"] == [4, 4, 2]
    assert sorted(once["recons_label"]) == list(range(10))
    test = collect(input_data.inputs("mnist", "test", str(data_dir), 4, random_shift=1))
    np.testing.assert_array_equal(test["recons_label"], np.arange(10))  # never shifted


@pytest.mark.slow
def test_distort_crops_and_rotates(unshifted):
    data_dir, images = unshifted
    test = collect(input_data.inputs("mnist", "test", str(data_dir), 10, distort=True))
    np.testing.assert_array_equal(test["images"], scaled(images)[:, 2:26, 2:26])
    train = input_data.inputs("mnist", "train", str(data_dir), 10, distort=True, random_shift=1)
    batch = next(train.as_numpy_iterator())
    assert batch["images"].shape == (10, 24, 24, 1)
    np.testing.assert_array_equal(batch["recons_image"], batch["images"])
    assert input_data.dataset_info("mnist", distort=True).height == 24


def test_rotate_turns_counterclockwise_about_the_centre():
    image = np.arange(24 * 24, dtype=np.float32).reshape(24, 24, 1)
    quarter = transforms.rotate(tf.constant(image), tf.constant(math.pi / 2)).numpy()
    np.testing.assert_array_equal(quarter[..., 0], np.rot90(image[..., 0]))
    np.testing.assert_array_equal(transforms.rotate(tf.constant(image), 0.0).numpy(), image)


def test_validate_reads_the_valid_files(tmp_path):
    images = digits(5)
    mnist_shift.write_single(images[:3], np.arange(3), str(tmp_path / record_name(
        "valid_test", 0)), 0, 0)
    mnist_shift.write_single(images, np.arange(5), str(tmp_path / record_name(
        "test", 0)), 0, 0)
    valid = collect(input_data.inputs("mnist", "test", str(tmp_path), 8, validate=True))
    np.testing.assert_array_equal(valid["images"], scaled(images[:3]))
    with pytest.raises(FileNotFoundError, match=(
            "train_2shifted_mnist_valid.tfrecords not found; make it with: python "
            "input_data/mnist/mnist_shift.py --data_dir=.* --split=valid_train --shift=2")):
        input_data.inputs("mnist", "train", str(tmp_path), 8, validate=True)


# ---- MultiMNIST --------------------------------------------------------------------------

def test_multi_generator_pairs_shards_and_merges(tmp_path):
    images, labels = digits(8, seed=3), np.arange(8, dtype=np.uint8)
    prefix = str(tmp_path / "multitrain_4shifted_mnist.tfrecords")
    names = mnist_shift.write_multi(images, labels, prefix, shift=4, pad=4, num_pairs=3,
                                    max_shard=5, seed=0)
    assert [os.path.basename(n) for n in names] == [
        f"multitrain_4shifted_mnist.tfrecords-{i:05d}-of-00005" for i in range(5)]
    shards = [read_records(name) for name in names]
    assert all(len(shard) <= 5 for shard in shards)
    records = [r for shard in shards for r in shard]
    assert len(records) == 8 * 3
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4)))
    bases = {}
    for r in records:
        assert (r["height"], r["width"], r["depth"]) == (36, 36, 1)
        assert r["label_1"] != r["label_2"]
        one, two = r["image_raw_1"], r["image_raw_2"]
        np.testing.assert_array_equal(r["merged_raw"],
                                      np.minimum(one.astype(int) + two, 255))
        find_shift(one.reshape(36, 36), padded[r["label_1"]], 4)
        find_shift(two.reshape(36, 36), padded[r["label_2"]], 4)
        bases.setdefault(r["label_1"], []).append(one)
    assert sorted(len(v) for v in bases.values()) == [3] * 8
    for same_base in bases.values():  # one shift per base image, as the reference
        np.testing.assert_array_equal(same_base[0], same_base[-1])


@pytest.mark.slow
def test_multi_generator_cli_and_reader(tmp_path):
    write_idx(tmp_path, (digits(4), np.array([1, 2, 3, 4], np.uint8)),
              (digits(6, seed=4), np.array([7, 2, 1, 0, 4, 1], np.uint8)))
    run_generator(f"--data_dir={tmp_path}", "--split=test", "--shift=4", "--pad=4",
                  "--multi_targets", "--num_pairs=2", "--max_shard=5")
    prefix = tmp_path / "multitest_4shifted_mnist.tfrecords"
    assert sorted(p.name for p in tmp_path.glob("multitest*")) == [
        f"{prefix.name}-{i:05d}-of-00003" for i in range(3)]
    out = collect(input_data.inputs("mnist", "test", f"{prefix}@3", 4, num_targets=2))
    assert sum(out["batch_sizes"]) == 12 and out["images"].shape[1:] == (36, 36, 1)
    raw = [r for i in range(3) for r in read_records(f"{prefix}-{i:05d}-of-00003")]
    np.testing.assert_array_equal(out["images"][..., 0].reshape(12, -1),
                                  [r["merged_raw"] * np.float32(1 / 255) for r in raw])
    np.testing.assert_array_equal(out["recons_label"], [r["label_1"] for r in raw])
    np.testing.assert_array_equal(out["spare_label"], [r["label_2"] for r in raw])
    np.testing.assert_array_equal(
        out["labels"], np.eye(10)[out["recons_label"]] + np.eye(10)[out["spare_label"]])
    np.testing.assert_array_equal(out["spare_image"][..., 0].reshape(12, -1),
                                  [r["image_raw_2"] * np.float32(1 / 255) for r in raw])
    train = next(input_data.inputs("mnist", "train", f"{prefix}@3", 12, num_targets=2,
                                   seed=1).as_numpy_iterator())
    assert sorted(train["recons_label"]) == sorted(out["recons_label"])


# ---- the reference's records -------------------------------------------------------------

@needs_official
def test_official_single_digit_records():
    mnist = OFFICIAL / "mnist"
    out = collect(input_data.inputs("mnist", "test", str(mnist), 3))
    raw = read_records(mnist / "test_0shifted_mnist.tfrecords")
    assert out["batch_sizes"] == [3, 1] and out["recons_label"][0] == 7
    pixels = np.stack([r["image_raw"].reshape(28, 28) for r in raw])
    np.testing.assert_array_equal(out["images"], scaled(pixels))
    for k in range(4):  # record k is the digit moved by (-2, k - 2)
        np.testing.assert_array_equal(pixels[k], mnist_shift.shift_image(pixels[2], 0, k - 2))
    train = collect(input_data.inputs("mnist", "train", str(mnist), 8, seed=0))
    assert list(train["recons_label"]) == [5] * 4


@needs_official
def test_official_records_equal_ours():
    mnist = OFFICIAL / "mnist"
    for record in tf.data.TFRecordDataset(str(mnist / "test_0shifted_mnist.tfrecords")):
        r = parse(record.numpy())
        ours = mnist_shift.single_example(r["image_raw"].reshape(28, 28), r["label"])
        assert tf.train.Example.FromString(ours) == tf.train.Example.FromString(record.numpy())
    for record in tf.data.TFRecordDataset(
            str(mnist / "multitest_4shifted_mnist.tfrecords-00000-of-00002")):
        r = parse(record.numpy())
        ours = mnist_shift.multi_example(r["image_raw_1"].reshape(36, 36),
                                         r["image_raw_2"].reshape(36, 36),
                                         r["label_1"], r["label_2"])
        assert tf.train.Example.FromString(ours) == tf.train.Example.FromString(record.numpy())


@needs_official
@pytest.mark.parametrize(("spec", "count", "first_label"), [
    ("multitest_4shifted_mnist.tfrecords@2", 4, 7),
    ("multitrain_4shifted_mnist.tfrecords@3", 6, 5)])
def test_official_multi_mnist_shards(spec, count, first_label):
    out = collect(input_data.inputs("mnist", "test", str(OFFICIAL / "mnist" / spec), 4,
                                    num_targets=2))
    assert sum(out["batch_sizes"]) == count and out["recons_label"][0] == first_label
    assert np.all(out["recons_label"] != out["spare_label"])
    np.testing.assert_allclose(
        out["images"], np.minimum(out["recons_image"] + out["spare_image"], 1), atol=1e-6)
    np.testing.assert_array_equal(out["labels"].sum(axis=1), 2)


# ---- bad input ---------------------------------------------------------------------------

def write_examples(path: Path, *features: dict) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for feature in features:
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())


GOOD = {"height": int64_feature(28), "width": int64_feature(28), "depth": int64_feature(1),
        "label": int64_feature(3), "image_raw": bytes_feature(bytes(784))}


@pytest.mark.parametrize(("change", "message"), [
    ({"label": None}, "feature label is missing or not one int64"),
    ({"label": int64_feature(12)}, "feature label is not a class in 0..9"),
    ({"image_raw": bytes_feature(bytes(700))}, "feature image_raw is missing or not 784 bytes"),
    ({"height": int64_feature(36)}, "feature height is missing or not 28"),
])
def test_bad_record_names_file_and_feature(tmp_path, change, message):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "test_0shifted_mnist.tfrecords"
    write_examples(path, GOOD, bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{path}: {message}"):
        collect(input_data.inputs("mnist", "test", str(tmp_path), 4))


def test_truncated_record_file_fails(tmp_path):
    path = tmp_path / "test_0shifted_mnist.tfrecords"
    write_examples(path, GOOD, GOOD, GOOD)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(tf.errors.DataLossError, match="truncated record"):
        collect(input_data.inputs("mnist", "test", str(tmp_path), 4))


def test_missing_files_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=(
            "test_0shifted_mnist.tfrecords not found; make it with: python "
            "input_data/mnist/mnist_shift.py --data_dir=.* --split=test --shift=0")):
        input_data.inputs("mnist", "test", str(tmp_path), 4)
    write_examples(tmp_path / "multi-00000-of-00002", GOOD)
    with pytest.raises(FileNotFoundError, match="multi-00001-of-00002 not found"):
        input_data.inputs("mnist", "test", f"{tmp_path}/multi@2", 4, num_targets=2)
    with pytest.raises(ValueError, match="expected PREFIX@N"):
        input_data.inputs("mnist", "test", str(tmp_path), 4, num_targets=2)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; expected one of: mnist, "
                                         "multimnist, cifar10, norb"):
        input_data.inputs("svhn", "test", str(tmp_path), 4)
    with pytest.raises(ValueError, match="unknown split 'valid'; expected one of: train, test"):
        input_data.inputs("mnist", "valid", str(tmp_path), 4)
    with pytest.raises(ValueError, match="random_shift=2"):
        input_data.inputs("mnist", "train", f"{tmp_path}/multi@2", 4, num_targets=2,
                          random_shift=2)


def test_dataset_info():
    info = input_data.dataset_info
    assert info("mnist") == input_data.DatasetInfo(28, 28, 1, 10, 1)
    assert info("mnist", distort=True).width == 24
    assert info("mnist", num_targets=2) == input_data.DatasetInfo(36, 36, 1, 10, 2)
    assert info("cifar10") == input_data.DatasetInfo(24, 24, 3, 10, 1)
    assert info("norb") == input_data.DatasetInfo(32, 32, 2, 5, 1)
    with pytest.raises(ValueError, match="num_targets=2"):
        info("cifar10", num_targets=2)


@pytest.mark.slow
def test_tensorflow_datasets_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        out = collect(input_data.inputs("mnist", "test", "tfds", 4))
        train = next(input_data.inputs("mnist", "train", "tfds", 4, seed=0).as_numpy_iterator())
    assert out["batch_sizes"] == [4, 2] and out["images"].shape[1:] == (28, 28, 1)
    assert train["images"].shape == (4, 28, 28, 1)
