"""Time of `python -m input_data.norb.convert` on full-size synthetic smallNORB files.

Writes the six NYU files (24,300 pairs per split by default; gzipped like the
downloads, or plain with --nogzip) into a temporary directory, then times the conversion
of both splits (48,600 pairs). The pairs are blocky images with a little noise, so that
gzip compresses them (level 1, to write them quickly; reading costs about the same
at any level).

  python benchmarks/norb_convert.py [--pairs=24300] [--nogzip] [--work_dir=DIR]
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from input_data.norb import convert, nyu  # noqa: E402

flags.DEFINE_integer("pairs", 24300, "Pairs per split (the real files hold 24,300).")
flags.DEFINE_boolean("gzip", True, "Write the files gzipped (.mat.gz), as they are downloaded.")
flags.DEFINE_string("work_dir", None, "Directory for the files (default: a temporary one, "
                    "removed at the end).")

BLOCK = 8  # pixels per block of the synthetic images


def synthetic_split(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """dat uint8 [n, 2, 96, 96], cat int32 [n] and info int32 [n, 4] of one split."""
    coarse = rng.integers(0, 256, (n, nyu.VIEWS, nyu.SIZE // BLOCK, nyu.SIZE // BLOCK),
                          dtype=np.uint8)
    dat = coarse.repeat(BLOCK, axis=2).repeat(BLOCK, axis=3)
    dat |= rng.integers(0, 8, dat.shape, dtype=np.uint8)
    cat = rng.integers(0, nyu.NUM_CLASSES, n).astype(np.int32)
    info = rng.integers(0, 18, (n, nyu.INFO_COLUMNS)).astype(np.int32)
    return {"dat": dat, "cat": cat, "info": info}


def write_files(nyu_dir: str, pairs: int, compress: bool) -> None:
    rng = np.random.default_rng(0)
    for split in convert.SPLITS:
        for kind, array in synthetic_split(rng, pairs).items():
            path = os.path.join(nyu_dir, nyu.file_name(split, kind))
            data = nyu.encode(array)
            if compress:
                with gzip.open(path + ".gz", "wb", compresslevel=1) as f:
                    f.write(data)
            else:
                with open(path, "wb") as f:
                    f.write(data)


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    root = f.work_dir or tempfile.mkdtemp(prefix="norb_convert_")
    nyu_dir, data_dir = os.path.join(root, "nyu"), os.path.join(root, "records")
    os.makedirs(nyu_dir, exist_ok=True)
    try:
        start = time.perf_counter()
        write_files(nyu_dir, f.pairs, f.gzip)
        size = sum(entry.stat().st_size for entry in os.scandir(nyu_dir))
        print(f"wrote the NYU files ({size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        counts = convert.convert(nyu_dir, data_dir)
        seconds = time.perf_counter() - start
        total = sum(counts.values())
        print(f"converted {total} pairs ({'gzipped' if f.gzip else 'plain'} files) in "
              f"{seconds:.1f} s, {total / seconds:.0f} pairs/s; load average now "
              f"{os.getloadavg()[0]:.2f}")
    finally:
        if not f.work_dir:
            shutil.rmtree(root)


if __name__ == "__main__":
    app.run(main)
