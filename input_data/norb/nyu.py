"""smallNORB's NYU binary matrix files: names, reading (plain or gzipped) and writing.

The format (https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/), as the official
`norb_convert.read_header` parses it: a little-endian int32 magic giving the element type,
an int32 number of dimensions ndim, then max(ndim, 3) int32 dimensions (the unused ones
padding the header), then the elements in row-major order. Per split:
  dat: uint8 [n, 2, 96, 96], the stereo pairs;
  cat: int32 [n], the class 0..4;
  info: int32 [n, 4], instance, elevation, azimuth and lighting.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from capsules.errors import MissingFileError, UsageError

SOURCE_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
SIZE = 96
VIEWS = 2
PAIR_BYTES = VIEWS * SIZE * SIZE
NUM_CLASSES = 5
INFO_COLUMNS = 4
UINT8_MAGIC = 0x1E3D4C55
INT32_MAGIC = 0x1E3D4C54
MAGIC_DTYPES = {
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
    INT32_MAGIC: np.dtype("<i4"),
    UINT8_MAGIC: np.dtype("u1"),
    0x1E3D4C56: np.dtype("<i2"),
}
DTYPE_MAGICS = {dtype: magic for magic, dtype in MAGIC_DTYPES.items()}
MAX_DIMS = 8  # the NYU files have at most 4; more means a corrupt header
# kind -> (magic, shape after the leading count n, what the shape means)
KINDS = {
    "dat": (UINT8_MAGIC, (VIEWS, SIZE, SIZE), "uint8 [n, 2, 96, 96]"),
    "cat": (INT32_MAGIC, (), "int32 [n]"),
    "info": (INT32_MAGIC, (INFO_COLUMNS,), "int32 [n, 4]"),
}
_INSTANCES = {"train": "46789", "test": "01235"}


def file_name(split: str, kind: str) -> str:
    """The NYU name of a split's file, e.g. smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat."""
    return f"smallnorb-5x{_INSTANCES[split]}x9x18x6x2x96x96-{split}ing-{kind}.mat"


def find(nyu_dir: str, split: str, kind: str) -> str:
    """The path of a split's file in `nyu_dir`: NAME.mat, else NAME.mat.gz.

    Raises:
      MissingFileError: naming both names and where to download them.
    """
    path = os.path.join(nyu_dir, file_name(split, kind))
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    raise MissingFileError(f"{path} not found (nor {os.path.basename(path)}.gz); download "
                            f"the six smallnorb-*.mat.gz files from {SOURCE_URL}")


def encode(array: np.ndarray) -> bytes:
    """The bytes of a NYU matrix file holding `array` (uint8, int32, int16, float32/64)."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in DTYPE_MAGICS:
        raise ValueError(f"dtype {array.dtype}: the NYU format has no magic for it")
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = struct.pack(f"<{2 + len(dims)}i", DTYPE_MAGICS[dtype], array.ndim, *dims)
    return header + np.ascontiguousarray(array, dtype).tobytes()


@dataclasses.dataclass(frozen=True)
class Header:
    """A file's header: element type, shape and header length in bytes."""

    dtype: np.dtype
    shape: tuple[int, ...]
    size: int

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def open_binary(path: str) -> BinaryIO:
    """`path` opened for reading bytes, decompressed on the fly if it ends in .gz."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_exactly(f: BinaryIO, count: int, path: str, what: str) -> bytes:
    """`count` bytes from `f`; UsageError naming `path` if the file ends (or is corrupt) first."""
    try:
        data = f.read(count)
    except (EOFError, OSError, zlib.error) as error:  # a cut or corrupt gzip stream
        raise UsageError(f"{path}: unreadable {what} ({error})") from None
    if len(data) != count:
        raise UsageError(f"{path}: truncated, the file ends {count - len(data)} bytes "
                         f"short of the {what}")
    return data


def read_header(f: BinaryIO, path: str, kind: str) -> Header:
    """Reads the header of a `kind` file ('dat', 'cat' or 'info') and checks it.

    Raises:
      UsageError: naming `path` when the magic, the dimensions or the shape are not the
        ones of `kind` (KINDS).
    """
    magic_expected, rest, meaning = KINDS[kind]
    magic, ndim = struct.unpack("<2i", _read_exactly(f, 8, path, "header"))
    if magic != magic_expected:
        raise UsageError(f"{path}: magic {magic & 0xFFFFFFFF:#x}, expected {magic_expected:#x} "
                         f"(a NYU {meaning} matrix)")
    if not 1 <= ndim <= MAX_DIMS:
        raise UsageError(f"{path}: {ndim} dimensions in the header, expected {meaning}")
    count = max(ndim, 3)
    shape = struct.unpack(f"<{count}i", _read_exactly(f, 4 * count, path, "header"))[:ndim]
    if shape[1:] != rest or shape[0] < 0:
        raise UsageError(f"{path}: shape {list(shape)}, expected {meaning}")
    return Header(MAGIC_DTYPES[magic], tuple(shape), 8 + 4 * count)


def check_size(path: str, header: Header) -> None:
    """For an uncompressed file, checks its length against its header before any reading."""
    if path.endswith(".gz"):
        return  # a gzip stream's length is known only by reading it
    expected = header.size + header.data_bytes
    actual = os.path.getsize(path)
    if actual < expected:
        raise UsageError(f"{path}: truncated, {actual} bytes, expected {expected} for shape "
                         f"{list(header.shape)}")
    if actual > expected:
        raise UsageError(f"{path}: {actual} bytes, more than the {expected} of its header's "
                         f"shape {list(header.shape)}")


def check_end(f: BinaryIO, path: str, header: Header) -> None:
    """Checks that nothing follows the data the header announced."""
    try:
        extra = f.read(1)
    except (EOFError, OSError, zlib.error) as error:
        raise UsageError(f"{path}: unreadable after the data ({error})") from None
    if extra:
        raise UsageError(f"{path}: more bytes than the shape {list(header.shape)} in its "
                         "header holds")


def read_array(path: str, kind: str) -> np.ndarray:
    """The whole matrix of a 'cat' or 'info' file, checked against its header."""
    with open_binary(path) as f:
        header = read_header(f, path, kind)
        check_size(path, header)
        data = _read_exactly(f, header.data_bytes, path, f"data of shape {list(header.shape)}")
        check_end(f, path, header)
    return np.frombuffer(data, header.dtype).reshape(header.shape)


def read_pairs(path: str, chunk: int = 256) -> Iterator[bytes]:
    """The stereo pairs of a 'dat' file, PAIR_BYTES each, streamed `chunk` pairs at a time.

    Raises:
      UsageError: naming `path` if its header is wrong or it ends before the last pair.
    """
    with open_binary(path) as f:
        header = read_header(f, path, "dat")
        check_size(path, header)
        total = header.shape[0]
        for start in range(0, total, chunk):
            count = min(chunk, total - start)
            data = _read_exactly(f, count * PAIR_BYTES, path,
                                 f"pairs {start}..{start + count - 1} of {total}")
            for i in range(count):
                yield data[i * PAIR_BYTES:(i + 1) * PAIR_BYTES]
        check_end(f, path, header)


def dat_count(path: str) -> int:
    """The number of pairs a 'dat' file's header announces (reads only the header)."""
    with open_binary(path) as f:
        header = read_header(f, path, "dat")
    check_size(path, header)
    return header.shape[0]
