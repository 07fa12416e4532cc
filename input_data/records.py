"""Shared helpers for record files: features, file names, atomic writes and checks."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import tensorflow as tf

from capsules.errors import MissingFileError, UsageError, error_line
from capsules.processes import process_alive

T = TypeVar("T")


def int64_feature(value: int) -> tf.train.Feature:
    """A feature holding one int64."""
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def int64_list_feature(values: Iterable[int]) -> tf.train.Feature:
    """A feature holding a list of int64s."""
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def bytes_feature(value: bytes) -> tf.train.Feature:
    """A feature holding one byte string."""
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def shard_names(prefix: str, num_shards: int) -> list[str]:
    """The file names of a set of `num_shards` shards: `PREFIX-0000i-of-0000N`."""
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def expand_sharded(spec: str) -> list[str]:
    """Expands `PREFIX@N` into its N shard names (the reference's notation)."""
    prefix, sep, count = spec.rpartition("@")
    if not sep or not prefix or not count.isdigit() or int(count) < 1:
        raise UsageError(f"sharded data set {spec!r}: expected PREFIX@N with N >= 1")
    return shard_names(prefix, int(count))


def require_files(paths: Sequence[str], how_to_make: str) -> None:
    """Raises MissingFileError naming the first missing path and the command that makes it.

    An empty file or a folder in a file's place is a UsageError saying the same.
    """
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise MissingFileError(f"{path} not found; make it with: {how_to_make}")
        if tf.io.gfile.isdir(path):
            raise UsageError(f"{path} is a folder, not a data file; make it with: {how_to_make}")
        if tf.io.gfile.stat(path).length == 0:
            raise UsageError(f"{path} is empty (0 bytes); make it again with: {how_to_make}")


def damaged_file(files: Sequence[str], read: Callable[[tf.Tensor], tf.data.Dataset]) -> str | None:
    """'<file>: <what is wrong>' for the first of `files` that `read` cannot read whole.

    Reads every record (in TensorFlow, without decoding them): a diagnosis made after a
    read error, whose own message does not name the file.
    """
    for path in files:
        try:
            read(tf.constant(path)).reduce(tf.constant(0, tf.int64), lambda count, _: count + 1)
        except tf.errors.OpError as error:
            return f"{path}: {error_line(error)} (damaged; make the file again)"
    return None


def remove_stale_temps(path: str) -> list[str]:
    """Removes the `PATH.tmp-PID` files of `atomic_paths` whose process is gone (killed)."""
    folder, name = os.path.split(path)
    pattern = re.compile(re.escape(name) + r"\.tmp-(\d+)$")
    removed = []
    for other in os.listdir(folder or ".") if os.path.isdir(folder or ".") else []:
        match = pattern.match(other)
        if match and not process_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, other))
                removed.append(os.path.join(folder, other))
    return removed


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str]) -> Iterator[list[str]]:
    """Yields temporary names for `paths`; renames them into place only on success.

    On any exception the temporary files are removed and the final paths are untouched.
    What a killed writer of the same paths left (`remove_stale_temps`) is removed first.
    """
    for path in paths:
        remove_stale_temps(path)
    temps = [f"{path}.tmp-{os.getpid()}" for path in paths]
    try:
        yield temps
        for temp, path in zip(temps, paths, strict=True):
            os.replace(temp, path)
    finally:
        for temp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Yields `items` unchanged while drawing a one-line progress bar on stderr."""
    start = last = time.monotonic()
    drawn = False
    try:
        for done, item in enumerate(items, 1):
            yield item
            now = time.monotonic()
            if now - last >= 0.5 or done == total:
                last, drawn = now, True
                frac = done / max(total, 1)
                bar = "#" * int(30 * frac)
                sys.stderr.write(
                    f"\r{desc}: [{bar:<30}] {done}/{total} {now - start:6.0f}s"
                )
                sys.stderr.flush()
    finally:  # also when the loop fails: an error message then starts on its own line
        if drawn:
            sys.stderr.write("\n")


def checked(value: tf.Tensor, ok: tf.Tensor, filename: tf.Tensor, what: str) -> tf.Tensor:
    """Returns `value`, failing the pipeline with '<filename>: <what>' when `ok` is false."""
    check = tf.debugging.Assert(ok, [tf.strings.join([filename, ": ", what])], summarize=1)
    with tf.control_dependencies([check]):
        return tf.identity(value)


def checked_class(label: tf.Tensor, num_classes: int, filename: tf.Tensor,
                  name: str) -> tf.Tensor:
    """`label` as int32, failing the pipeline unless it is in 0..num_classes-1."""
    label = tf.cast(label, tf.int32)
    ok = tf.logical_and(label >= 0, label < num_classes)
    return checked(label, ok, filename, f"{name} is not a class in 0..{num_classes - 1}")


def parse_example(
    filename: tf.Tensor,
    record: tf.Tensor,
    ints: dict[str, int | None],
    raws: dict[str, int],
    int_lists: dict[str, int] | None = None,
) -> dict[str, tf.Tensor]:
    """Parses one tf.train.Example, checking every feature is present and sized right.

    Args:
      filename: scalar string, the file the record came from (named in errors).
      record: scalar string, the serialized tf.train.Example.
      ints: int64 features to read, each holding exactly one value; value None means any
        value, an int means that value exactly.
      raws: bytes features holding raw uint8 pixels, name -> required byte count.
      int_lists: int64 list features to read, name -> required number of values.

    Returns:
      {name: int64 scalar} for `ints`, {name: uint8 [byte count]} for `raws` and
      {name: int64 [count]} for `int_lists`.
    """
    int_lists = int_lists or {}
    spec = {name: tf.io.RaggedFeature(tf.int64) for name in (*ints, *int_lists)}
    spec.update({name: tf.io.RaggedFeature(tf.string) for name in raws})
    parsed = tf.io.parse_single_example(record, spec)
    out = {}
    for name, count in int_lists.items():
        values = parsed[name]
        ok = tf.equal(tf.size(values), count)
        what = f"feature {name} is missing or not {count} int64s"
        out[name] = tf.reshape(checked(values, ok, filename, what), [count])
    for name, required in ints.items():
        values = parsed[name]
        ok = tf.equal(tf.size(values), 1)
        what = f"feature {name} is missing or not one int64"
        if required is not None:
            ok = tf.logical_and(ok, tf.reduce_all(tf.equal(values, required)))
            what = f"feature {name} is missing or not {required}"
        out[name] = checked(values, ok, filename, what)[0]
    for name, size in raws.items():
        values = parsed[name]
        ok = tf.logical_and(
            tf.equal(tf.size(values), 1),
            tf.reduce_all(tf.equal(tf.strings.length(values), size)),
        )
        raw = checked(values, ok, filename, f"feature {name} is missing or not {size} bytes")
        out[name] = tf.reshape(tf.io.decode_raw(raw, tf.uint8), [size])
    return out
