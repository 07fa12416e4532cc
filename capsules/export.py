"""Writes a weights-only copy of a training checkpoint (no optimizer slots), for shipping.

  python -m capsules.export --checkpoint=runs/mnist/train/model.ckpt-3500 \
      --output_dir=checkpoints/mnist
  python -m capsules.export --checkpoint=REFERENCE_DIR/model.ckpt-N --output_dir=OUT \
      --model=capsule --dataset=mnist   # a reference TF1 checkpoint (no run file)
  python -m capsules.export --checkpoint=runs/mnist/train/model.ckpt-3500 \
      --output_dir=OUT --dtype=float32  # trained under --mixed_bfloat16, loads in float32

The copy holds the weights that `load_model` gives the checkpoint (their moving average for
an EMCapsNet trained with one, EMHParams.ema_momentum). It is a tf.train.Checkpoint of the
model alone, model.ckpt-STEP with a `checkpoint` state file (so
`tf.train.latest_checkpoint(output_dir)` finds it), and the run file beside it
(`capsules.checkpoints.RUN_FILE`: the model, its config, hparams and the run's flags), so
that `capsules.checkpoints.load_model` rebuilds it from the path alone.
"""

from __future__ import annotations

# ruff: noqa: E402 - a command quiets TensorFlow's C++ logs before the imports below load it
from capsules.tf_logs import quiet_tensorflow_logs

if __name__ == "__main__":
    quiet_tensorflow_logs()

import os
import sys
from typing import Any

import tensorflow as tf
from absl import app, flags

from capsules import checkpoints, datasets
from capsules.errors import FILE_ERRORS, UsageError, error_line
from capsules.models import MODELS


def export_weights(checkpoint: str, output_dir: str, model: str | None = None,
                   dataset_info: Any = None, dtype: str | None = None) -> str:
    """Restores `checkpoint` into its model and saves the weights alone to output_dir.

    `model` and `dataset_info` are needed only for a checkpoint without a (complete) run
    file, as `capsules.checkpoints.load_model` says. `dtype` is the policy the copy's run
    file rebuilds the model in ("float32", "mixed_bfloat16"; None: the training's); the
    weights are float32 either way, so the copy holds the same numbers. Returns the new
    checkpoint's prefix, output_dir/model.ckpt-STEP. `checkpoint` may also be its `.index`
    file or a folder (its latest checkpoint).
    """
    checkpoint = checkpoints.resolve_checkpoint(checkpoint)
    restored = checkpoints.load_model(checkpoint, model=model, dataset_info=dataset_info,
                                      dtype=dtype)
    run = checkpoints.read_run_file(checkpoint)
    step = checkpoints.checkpoint_step(checkpoint)
    os.makedirs(output_dir, exist_ok=True)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=restored), output_dir, max_to_keep=1,
        checkpoint_name="model.ckpt")
    prefix = manager.save(checkpoint_number=step)
    checkpoints.write_run_file(output_dir, restored, run.flags if run else {})
    return prefix


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    try:
        info = (datasets.dataset_info(values.dataset, values.num_targets, values.distort)
                if values.dataset else None)
        print(export_weights(values.checkpoint, values.output_dir, values.model, info,
                             values.dtype))
    except (UsageError, *FILE_ERRORS) as error:
        print(f"export: error: {error_line(error)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "The training checkpoint to export.", required=True)
    flags.DEFINE_string("output_dir", None, "Where to write the weights.", required=True)
    # What the run file says; needed only for a checkpoint without one (the reference's).
    flags.DEFINE_enum("model", None, list(MODELS),
                      "The model, for a checkpoint without a run file.")
    flags.DEFINE_enum("dataset", None, list(datasets.DATASETS),
                      "The data set the model is for, for a checkpoint without a run file "
                      "(with --num_targets and --distort as in experiment.py).")
    flags.DEFINE_integer("num_targets", None, "1, or 2 for MultiMNIST (default: the data "
                         "set's, 2 for multimnist).", lower_bound=1, upper_bound=2)
    flags.DEFINE_bool("distort", False, "MNIST: the 24x24 crops of experiment.py --distort.")
    flags.DEFINE_enum("dtype", None, ["float32", "mixed_bfloat16"],
                      "The dtype policy the copy loads in (default: the one it was trained in).")
    app.run(main)
