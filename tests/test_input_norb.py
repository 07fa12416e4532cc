"""The smallNORB reader on the reference's records and on bad records."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import input_data
from capsules.errors import UsageError
from input_data.records import bytes_feature, int64_feature, int64_list_feature

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "official"
needs_official = pytest.mark.skipif(
    not (OFFICIAL / "norb").is_dir(),
    reason=f"reference records not found at {OFFICIAL} (../shared)")


def raw_records(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, 96, 96, 2] and labels [n] straight from the record bytes."""
    images, labels = [], []
    for record in tf.data.TFRecordDataset(str(path)):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        views = np.frombuffer(feature["image_raw"].bytes_list.value[0], np.uint8)
        images.append(views.reshape(2, 96, 96).transpose(1, 2, 0))
        labels.append(feature["label"].int64_list.value[0])
    return np.stack(images), np.array(labels)


def standardized(images: np.ndarray) -> np.ndarray:
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    std = images.std(axis=(1, 2, 3), keepdims=True)
    return (images - mean) / np.maximum(std, 1 / np.sqrt(images[0].size))


@needs_official
def test_official_test_records():
    norb = OFFICIAL / "norb"
    images, labels = raw_records(norb / "testduo.tfrecords")
    batches = list(input_data.inputs("norb", "test", str(norb), 4).as_numpy_iterator())
    assert [len(b["labels"]) for b in batches] == [4, 2]
    out = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    np.testing.assert_array_equal(out["recons_label"], labels)
    np.testing.assert_array_equal(out["labels"], np.eye(5)[labels])
    # TF1 bilinear resize 96 -> 48 samples every other pixel; then the central 32x32.
    expected = standardized(images[:, ::2, ::2][:, 8:40, 8:40].astype(np.float64))
    np.testing.assert_allclose(out["images"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["recons_image"], out["images"])


@needs_official
@pytest.mark.slow
def test_official_train_records():
    norb = OFFICIAL / "norb"
    _, labels = raw_records(norb / "trainduo.tfrecords")
    ds = input_data.inputs("norb", "train", str(norb), 6, seed=0)
    batch = next(ds.as_numpy_iterator())
    assert batch["images"].shape == (6, 32, 32, 2)
    assert sorted(batch["recons_label"]) == sorted(labels)
    np.testing.assert_allclose(batch["images"].mean(axis=(1, 2, 3)), 0, atol=1e-4)
    again = input_data.inputs("norb", "train", str(norb), 6, seed=0)
    np.testing.assert_array_equal(next(again.as_numpy_iterator())["images"], batch["images"])
    assert input_data.dataset_info("norb") == input_data.DatasetInfo(32, 32, 2, 5, 1)


def test_bad_records_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="testduo.tfrecords not found"):
        input_data.inputs("norb", "test", str(tmp_path), 4)
    feature = {"height": int64_feature(96), "width": int64_feature(96),
               "depth": int64_feature(2), "label": int64_feature(1),
               "meta": int64_list_feature([0, 0, 0, 0]),
               "image_raw": bytes_feature(bytes(96 * 96))}  # one view instead of two
    for bad, message in (({}, "feature image_raw is missing or not 18432"),
                         ({"image_raw": bytes_feature(bytes(2 * 96 * 96)),
                           "meta": int64_list_feature([0, 0, 0])},
                          "feature meta is missing or not 4 int64s")):
        with tf.io.TFRecordWriter(str(tmp_path / "testduo.tfrecords")) as writer:
            writer.write(tf.train.Example(features=tf.train.Features(
                feature={**feature, **bad})).SerializeToString())
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"testduo.tfrecords: {message}"):
            list(input_data.inputs("norb", "test", str(tmp_path), 4))


# ---- test-time crops (--patching) ----------------------------------------------------

def official_patches(image: np.ndarray) -> np.ndarray:
    """The EM-routing reference's 13 crops of one uint8 [96, 96, 2] image, computed with the
    TF1 ops its norb_record.inputs calls (batch size 1): [13, 32, 32, 2]."""
    orig = tf.compat.v1.image.resize_images(tf.cast(image, tf.float32)[None], [48, 48])
    centre = tf.image.per_image_standardization(
        tf.image.resize_with_crop_or_pad(orig, 32, 32))
    tiled = tf.tile(orig, [4, 1, 1, 1])
    corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)
    glimpses = [tf.image.per_image_standardization(tf.compat.v1.image.extract_glimpse(
        tiled, [32, 32], k * corners, centered=True, normalized=False)) for k in (1, 2, 3)]
    return tf.concat([centre, *glimpses], axis=0).numpy()


def write_test_records(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """testduo.tfrecords of uint8 images [n, 96, 96, 2], as the converter writes them."""
    with tf.io.TFRecordWriter(str(directory / "testduo.tfrecords")) as writer:
        for image, label in zip(images, labels, strict=True):
            feature = {"height": int64_feature(96), "width": int64_feature(96),
                       "depth": int64_feature(2), "label": int64_feature(label),
                       "meta": int64_list_feature([0, 1, 2, 3]),
                       "image_raw": bytes_feature(image.transpose(2, 0, 1).tobytes())}
            writer.write(tf.train.Example(
                features=tf.train.Features(feature=feature)).SerializeToString())


@pytest.mark.slow
def test_patching_gives_the_official_13_standardized_crops(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 96, 96, 2), dtype=np.uint8)
    write_test_records(tmp_path, images, np.array([4, 0, 2]))
    batches = list(input_data.inputs("norb", "test", str(tmp_path), 2,
                                     patching=True).as_numpy_iterator())
    out = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    assert out["images"].shape == (3, 13, 32, 32, 2)
    for image, patches in zip(images, out["images"], strict=True):
        np.testing.assert_allclose(patches, official_patches(image), atol=1e-5)
    # The TF1 glimpse halves the offsets: the (1, 1) glimpse is the central crop again.
    np.testing.assert_array_equal(out["images"][:, 1], out["images"][:, 0])
    assert not np.allclose(out["images"][:, 12], out["images"][:, 0])
    central = next(input_data.inputs("norb", "test", str(tmp_path), 3).as_numpy_iterator())
    np.testing.assert_array_equal(out["images"][:, 0], central["images"])
    np.testing.assert_array_equal(out["recons_image"], central["images"])
    np.testing.assert_array_equal(out["recons_label"], [4, 0, 2])
    np.testing.assert_array_equal(out["labels"], np.eye(5)[[4, 0, 2]])


def test_patching_is_for_norb_evaluation_only(tmp_path):
    with pytest.raises(UsageError, match="patching=True: .* norb evaluation only, not norb "
                                         "train"):
        input_data.inputs("norb", "train", str(tmp_path), 4, patching=True)
    for dataset in ("mnist", "multimnist", "cifar10"):
        with pytest.raises(UsageError, match=f"not {dataset} test"):
            input_data.inputs(dataset, "test", str(tmp_path), 4, patching=True)
