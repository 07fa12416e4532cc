"""input_data.norb.convert: NYU files written here byte by byte (plain and gzipped) into the
reference's records, read back by the reader; the reference's own records reproduced; every
bad file stopping with one line naming it and leaving the output directory as it was."""

from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from capsules.errors import MissingFileError, UsageError
from input_data.norb import convert, norb_input_record, nyu
from tests.test_experiment import message_lines

ROOT = Path(__file__).resolve().parents[1]
UINT8, INT32 = 0x1E3D4C55, 0x1E3D4C54  # the NYU page's magics, restated independently
SPLITS = ("train", "test")
NAMES = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training-{}.mat",
         "test": "smallnorb-5x01235x9x18x6x2x96x96-testing-{}.mat"}


def matrix_bytes(magic: int, array: np.ndarray, dims: list[int] | None = None) -> bytes:
    """A NYU matrix file: int32 magic, ndim, max(ndim, 3) dims (padded with 1), data."""
    dims = list(array.shape) if dims is None else dims
    padded = dims + [1] * (3 - len(dims))
    little = array.astype(array.dtype.newbyteorder("<"))
    return struct.pack(f"<{2 + len(padded)}i", magic, len(dims), *padded) + little.tobytes()


def split_arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"dat": rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8),
            "cat": rng.integers(0, 5, n, dtype=np.int32),
            "info": np.stack([rng.integers(0, 10, n), rng.integers(0, 9, n),
                              2 * rng.integers(0, 18, n), rng.integers(0, 6, n)],
                             axis=1).astype(np.int32)}


def write_file(path: Path, data: bytes, gzipped: bool) -> Path:
    if gzipped:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_nyu(nyu_dir: Path, arrays: dict[str, dict[str, np.ndarray]],
              gzipped: tuple[str, ...] = ()) -> dict[tuple[str, str], Path]:
    """The six files of `arrays` ({split: {kind: array}}); kinds in `gzipped` get .mat.gz."""
    nyu_dir.mkdir(exist_ok=True)
    paths = {}
    for split, kinds in arrays.items():
        for kind, array in kinds.items():
            magic = UINT8 if kind == "dat" else INT32
            paths[split, kind] = write_file(nyu_dir / NAMES[split].format(kind),
                                            matrix_bytes(magic, array), kind in gzipped)
    return paths


def decoded(path: Path) -> dict[str, np.ndarray]:
    """image uint8 [n, 96, 96, 2], label [n] and meta [n, 4] of a record file, by the reader."""
    ds = tf.data.TFRecordDataset(str(path)).map(
        lambda record: norb_input_record.decode(tf.constant(str(path)), record))
    rows = list(ds.as_numpy_iterator())
    return {key: np.stack([row[key] for row in rows]) for key in ("image", "label", "meta")}


def examples(path: Path) -> list[tf.train.Example]:
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


@pytest.fixture
def good(tmp_path) -> dict:
    arrays = {"train": split_arrays(3, 0), "test": split_arrays(2, 1)}
    return {"arrays": arrays, "nyu": tmp_path / "nyu", "out": tmp_path / "out"}


# ---- round trips --------------------------------------------------------------------

@pytest.mark.parametrize("sizes,gzipped", [
    ((1, 2), ()),
    ((5, 3), ("dat", "cat", "info")),
    ((300, 7), ("dat",)),  # more pairs than one read chunk (256)
])
@pytest.mark.slow
def test_nyu_files_round_trip_through_convert_and_the_reader(tmp_path, sizes, gzipped):
    arrays = {split: split_arrays(n, seed)
              for seed, (split, n) in enumerate(zip(SPLITS, sizes, strict=True))}
    write_nyu(tmp_path / "nyu", arrays, gzipped)
    counts = convert.convert(str(tmp_path / "nyu"), str(tmp_path / "out"))
    assert counts == dict(zip(SPLITS, sizes, strict=True))
    assert sorted(os.listdir(tmp_path / "out")) == ["testduo.tfrecords", "trainduo.tfrecords"]
    for split in SPLITS:
        got = decoded(tmp_path / "out" / f"{split}duo.tfrecords")
        np.testing.assert_array_equal(got["image"], arrays[split]["dat"].transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(got["label"], arrays[split]["cat"])
        np.testing.assert_array_equal(got["meta"], arrays[split]["info"])


def test_records_carry_the_official_converters_features(good):
    write_nyu(good["nyu"], good["arrays"])
    convert.convert(str(good["nyu"]), str(good["out"]))
    first = examples(good["out"] / "trainduo.tfrecords")[0].features.feature
    dat = good["arrays"]["train"]["dat"][0]
    assert first["image_raw"].bytes_list.value == [dat.tobytes()]  # [2, 96, 96] as stored
    assert [first[k].int64_list.value[:] for k in ("height", "width", "depth")] == [
        [96], [96], [2]]
    assert first["label"].int64_list.value[:] == [good["arrays"]["train"]["cat"][0]]
    assert first["meta"].int64_list.value[:] == list(good["arrays"]["train"]["info"][0])


def test_the_reference_records_are_reproduced_from_their_nyu_files(official_testdata, tmp_path):
    """NYU files holding the reference records' pairs convert into equal tf.train.Examples."""
    norb = official_testdata / "norb"
    official = {split: examples(norb / f"{split}duo.tfrecords") for split in SPLITS}
    arrays = {}
    for split, records in official.items():
        features = [e.features.feature for e in records]
        arrays[split] = {
            "dat": np.stack([np.frombuffer(f["image_raw"].bytes_list.value[0], np.uint8)
                             .reshape(2, 96, 96) for f in features]),
            "cat": np.array([f["label"].int64_list.value[0] for f in features], np.int32),
            "info": np.array([f["meta"].int64_list.value for f in features], np.int32),
        }
    write_nyu(tmp_path / "nyu", arrays, gzipped=("dat",))
    convert.convert(str(tmp_path / "nyu"), str(tmp_path / "out"))
    for split in SPLITS:
        ours = examples(tmp_path / "out" / f"{split}duo.tfrecords")
        assert ours == official[split]  # same feature names, kinds and values
        assert set(ours[0].features.feature) == {"height", "width", "depth", "label", "meta",
                                                 "image_raw"}


def test_encode_writes_the_nyu_layout():
    info = np.arange(8, dtype=np.int32).reshape(2, 4)
    assert nyu.encode(info) == matrix_bytes(INT32, info)
    assert nyu.encode(info)[:20] == struct.pack("<5i", INT32, 2, 2, 4, 1)
    dat = np.zeros((1, 2, 96, 96), np.uint8)
    assert nyu.encode(dat)[:24] == struct.pack("<6i", UINT8, 4, 1, 2, 96, 96)


# ---- bad files ----------------------------------------------------------------------

def cut(data: bytes, count: int) -> bytes:
    return data[:len(data) - count]


def bad_cases(arrays) -> dict[str, tuple[str, str, bytes, bool, str]]:
    """name -> (split, kind, file bytes, gzipped, expected message after the path)."""
    dat, cat, info = (arrays["test"][k] for k in ("dat", "cat", "info"))
    good_dat = matrix_bytes(UINT8, dat)
    return {
        "dat with the int32 magic": (
            "test", "dat", matrix_bytes(INT32, dat.astype(np.int32)), False,
            "magic 0x1e3d4c54, expected 0x1e3d4c55"),
        "cat with the uint8 magic": (
            "test", "cat", matrix_bytes(UINT8, cat.astype(np.uint8)), False,
            "magic 0x1e3d4c55, expected 0x1e3d4c54"),
        "not a NYU file": ("train", "info", b"PK\x03\x04" + bytes(40), False, "magic 0x"),
        "dat of 95-pixel rows": (
            "test", "dat", matrix_bytes(UINT8, dat[..., :95]), False,
            r"shape \[2, 2, 96, 95\], expected uint8 \[n, 2, 96, 96\]"),
        "info of 3 columns": (
            "test", "info", matrix_bytes(INT32, info[:, :3]), True,
            r"shape \[2, 3\], expected int32 \[n, 4\]"),
        "absurd ndim": ("test", "cat", struct.pack("<5i", INT32, 99, 2, 1, 1), False,
                        "99 dimensions"),
        "header cut": ("test", "dat", good_dat[:10], False, "truncated"),
        "plain dat cut": ("test", "dat", cut(good_dat, 5), False,
                          "truncated, 36883 bytes, expected 36888"),
        "gzipped dat cut": ("test", "dat", cut(good_dat, 5), True,
                            "truncated, the file ends 5 bytes short of the pairs 0..1 of 2"),
        "gzip stream cut": ("test", "dat", cut(gzip.compress(good_dat), 9), None,
                            "unreadable pairs 0..1 of 2"),
        "not gzip": ("test", "info", matrix_bytes(INT32, info), None, "unreadable header"),
        "gzipped info too long": ("test", "info", matrix_bytes(INT32, info) + b"\0", True,
                                  r"more bytes than the shape \[2, 4\]"),
        "plain dat too long": ("test", "dat", good_dat + b"\0", False,
                               "36889 bytes, more than the 36888"),
        "one label short": ("test", "cat", matrix_bytes(INT32, cat[:1]), False,
                            "1 labels, expected 2 as .*testing-dat.mat holds 2 pairs"),
        "one info row more": ("test", "info", matrix_bytes(INT32, np.concatenate([info, info])),
                              True, "4 info rows, expected 2 as .*testing-dat.mat holds 2"),
        "label 5": ("test", "cat", matrix_bytes(INT32, np.array([0, 5], np.int32)), False,
                    "label 5 at index 1, expected a class in 0..4"),
    }


BAD = list(bad_cases({"test": split_arrays(2, 1)}))


@pytest.mark.parametrize("case", BAD)
def test_a_bad_file_stops_with_one_line_naming_it_and_writes_nothing(good, case):
    split, kind, data, gzipped, message = bad_cases(good["arrays"])[case]
    write_nyu(good["nyu"], good["arrays"])
    plain = good["nyu"] / NAMES[split].format(kind)
    plain.unlink()
    if gzipped is None:  # the bytes as they are under the .gz name: a cut or non-gzip stream
        path = plain.with_name(plain.name + ".gz")
        path.write_bytes(data)
    else:
        path = write_file(plain, data, gzipped)
    good["out"].mkdir()
    (good["out"] / "trainduo.tfrecords").write_bytes(b"previous")
    with pytest.raises(UsageError, match=f"^{re.escape(str(path))}: {message}") as error:
        convert.convert(str(good["nyu"]), str(good["out"]))
    assert "\n" not in str(error.value)
    assert os.listdir(good["out"]) == ["trainduo.tfrecords"]  # no temporary left
    assert (good["out"] / "trainduo.tfrecords").read_bytes() == b"previous"


def test_a_missing_file_names_it_and_the_download(good):
    write_nyu(good["nyu"], good["arrays"])
    missing = good["nyu"] / NAMES["test"].format("info")
    missing.unlink()
    with pytest.raises(MissingFileError,
                       match=f"^{re.escape(str(missing))} not found .*{nyu.SOURCE_URL}"):
        convert.convert(str(good["nyu"]), str(good["out"]))
    assert not good["out"].exists()


@pytest.mark.slow
def test_the_command_line_converts_and_reports_errors_in_one_line(good):
    write_nyu(good["nyu"], good["arrays"], gzipped=("dat",))
    command = [sys.executable, "-m", "input_data.norb.convert", f"--nyu_dir={good['nyu']}",
               f"--data_dir={good['out']}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote 2 pairs to {good['out'] / 'testduo.tfrecords'}" in done.stdout
    assert f"{good['out'] / 'testduo.tfrecords'}: [" in done.stderr  # the progress bar
    bad = good["nyu"] / NAMES["train"].format("cat")
    bad.write_bytes(matrix_bytes(INT32, good["arrays"]["train"]["cat"][:2]))
    failed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    # TensorFlow's own log lines are left out: oneDNN's start-up notice, printed where oneDNN is
    # on by default (AVX-512 CPUs), speaks of "round-off errors".
    errors = [line for line in message_lines(failed.stderr) if "error" in line]
    assert errors == [f"convert: error: {bad}: 2 labels, expected 3 as "
                      f"{good['nyu'] / NAMES['train'].format('dat')}.gz holds 3 pairs"]
