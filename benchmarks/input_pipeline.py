"""Throughput of the input pipeline alone (no model): batches/s and images/s.

  python benchmarks/input_pipeline.py --dataset=mnist --data_dir=DIR --batch_size=128
  python benchmarks/input_pipeline.py --data_dir=DIR --random_shift=2   # 0-shift file
  python benchmarks/input_pipeline.py --dataset=multimnist --data_dir=DIR  # pairs on the fly
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import input_data  # noqa: E402

flags.DEFINE_string("dataset", "mnist", "mnist, multimnist, cifar10 or norb.")
flags.DEFINE_string("data_dir", None, "The data set's directory (PREFIX@N for MultiMNIST "
                    "records; multimnist: the MNIST IDX files' directory).")
flags.DEFINE_enum("split", "train", ["train", "test"], "Split to read.")
flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
flags.DEFINE_integer("num_targets", None, "2 for MultiMNIST records (default: the data set's).")
flags.DEFINE_integer("random_shift", 0, "On-the-fly shift of the 0-shift MNIST file.")
flags.DEFINE_boolean("distort", False, "MNIST crop-and-rotate distortion.")
flags.DEFINE_integer("warmup", 20, "Batches read before timing (fills the shuffle buffer).")
flags.DEFINE_integer("steps", 500, "Batches timed.")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    ds = input_data.inputs(f.dataset, f.split, f.data_dir, f.batch_size,
                           num_targets=f.num_targets, distort=f.distort,
                           random_shift=f.random_shift, repeat=True, seed=0)
    batches = iter(ds)
    for _ in range(f.warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(f.steps):
        next(batches)
    seconds = time.perf_counter() - start
    rate = f.steps / seconds
    print(f"{f.dataset} {f.split} batch {f.batch_size}: {rate:.1f} batches/s, "
          f"{rate * f.batch_size:.0f} images/s ({f.steps} batches in {seconds:.1f} s, "
          f"{os.cpu_count()} CPUs)")


if __name__ == "__main__":
    flags.mark_flag_as_required("data_dir")
    app.run(main)
