"""Converts smallNORB's six NYU files into the records the readers expect.

  python -m input_data.norb.convert --nyu_dir=DIR --data_dir=OUT

Reads `smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat` and
`smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat` (each plain or .gz) from
--nyu_dir and writes `trainduo.tfrecords` and `testduo.tfrecords` into --data_dir, as the
official `norb_convert.py` does: one tf.train.Example per stereo pair, in file order, with
height=96, width=96, depth=2, label (the cat value), meta (the four info values) and
image_raw (the pair's 2x96x96 bytes as stored). Every header and count is checked before
anything is written, and both files are written under temporary names and renamed only
when both are complete: on an error, --data_dir is left as it was.
"""

from __future__ import annotations

# ruff: noqa: E402 - a command quiets TensorFlow's C++ logs before the imports below load it
from capsules.tf_logs import quiet_tensorflow_logs

if __name__ == "__main__":
    quiet_tensorflow_logs()

import os
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags

from capsules.errors import UsageError
from input_data.norb import nyu
from input_data.norb.norb_input_record import record_name
from input_data.records import (
    atomic_paths,
    bytes_feature,
    int64_feature,
    int64_list_feature,
    progress,
)

SPLITS = ("train", "test")


def example(pair: bytes, label: int, meta: np.ndarray) -> bytes:
    """The serialized tf.train.Example of one pair, with the official converter's features."""
    feature = {
        "height": int64_feature(nyu.SIZE),
        "width": int64_feature(nyu.SIZE),
        "depth": int64_feature(nyu.VIEWS),
        "label": int64_feature(label),
        "meta": int64_list_feature(meta),
        "image_raw": bytes_feature(pair),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def load_split(nyu_dir: str, split: str) -> tuple[str, np.ndarray, np.ndarray]:
    """The split's dat path (its pairs are streamed later), labels [n] and info [n, 4].

    Raises:
      MissingFileError: a file is missing.
      UsageError: naming the file, for a wrong header, a truncated file, counts that
        disagree between dat, cat and info, or a label outside 0..4.
    """
    dat, cat, info = (nyu.find(nyu_dir, split, kind) for kind in ("dat", "cat", "info"))
    count = nyu.dat_count(dat)
    labels = nyu.read_array(cat, "cat")
    meta = nyu.read_array(info, "info")
    for path, rows, what in ((cat, labels, "labels"), (info, meta, "info rows")):
        if len(rows) != count:
            raise UsageError(f"{path}: {len(rows)} {what}, expected {count} as {dat} holds "
                             f"{count} pairs")
    bad = np.flatnonzero((labels < 0) | (labels >= nyu.NUM_CLASSES))
    if bad.size:
        raise UsageError(f"{cat}: label {labels[bad[0]]} at index {bad[0]}, expected a class "
                         f"in 0..{nyu.NUM_CLASSES - 1}")
    return dat, labels, meta


def write_split(dat: str, labels: np.ndarray, meta: np.ndarray, path: str,
                desc: str) -> None:
    """Writes one record per pair of `dat` to `path`, drawing a progress bar named `desc`."""
    pairs = zip(nyu.read_pairs(dat), labels, meta, strict=True)
    with tf.io.TFRecordWriter(path) as writer:
        for pair, label, row in progress(pairs, len(labels), desc):
            writer.write(example(pair, int(label), row))


def convert(nyu_dir: str, data_dir: str) -> dict[str, int]:
    """Writes `{train,test}duo.tfrecords` in `data_dir` from the NYU files in `nyu_dir`.

    Returns:
      The number of pairs written per split.
    """
    sources = {split: load_split(nyu_dir, split) for split in SPLITS}
    os.makedirs(data_dir, exist_ok=True)
    paths = [os.path.join(data_dir, record_name(split)) for split in SPLITS]
    with atomic_paths(paths) as temps:
        for split, temp, path in zip(SPLITS, temps, paths, strict=True):
            write_split(*sources[split], temp, desc=path)
    return {split: len(sources[split][1]) for split in SPLITS}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    try:
        counts = convert(f.nyu_dir, f.data_dir)
    except (UsageError, OSError) as error:  # OSError: a file that cannot be written
        print(f"convert: error: {error}", file=sys.stderr)
        sys.exit(1)
    for split, count in counts.items():
        print(f"wrote {count} pairs to {os.path.join(f.data_dir, record_name(split))}")


if __name__ == "__main__":
    flags.DEFINE_string("nyu_dir", None, "Directory of the six smallnorb-*.mat[.gz] files "
                        f"({nyu.SOURCE_URL}).")
    flags.DEFINE_string("data_dir", None, "Directory to write {train,test}duo.tfrecords into.")
    flags.mark_flags_as_required(["nyu_dir", "data_dir"])
    app.run(main)
