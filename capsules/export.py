"""Writes a weights-only copy of a training checkpoint (no optimizer slots), for shipping.

  python -m capsules.export --checkpoint=runs/mnist/train/model.ckpt-3500 \
      --output_dir=checkpoints/mnist [--dataset=mnist --model=capsule]

The copy is a tf.train.Checkpoint of the model alone, model.ckpt-STEP with a `checkpoint`
state file (so `tf.train.latest_checkpoint(output_dir)` finds it), and the hparams.json
of the run beside it.
"""

from __future__ import annotations

import os
import shutil
import sys

import tensorflow as tf
from absl import app, flags

import input_data
from capsules import checkpoints
from capsules.models import build_model

FLAGS = flags.FLAGS


def export_weights(checkpoint: str, output_dir: str, model_name: str = "capsule",
                   dataset: str = "mnist", num_targets: int = 1) -> str:
    """Restores `checkpoint` into a fresh model and saves its weights alone to output_dir.

    Returns the new checkpoint's prefix, output_dir/model.ckpt-STEP.
    """
    hparams = checkpoints.checkpoint_hparams(checkpoint)
    model = build_model(model_name, hparams, input_data.dataset_info(dataset, num_targets))
    checkpoints.restore_weights(model, checkpoint)
    step = checkpoints.checkpoint_step(checkpoint)
    os.makedirs(output_dir, exist_ok=True)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model), output_dir, max_to_keep=1,
        checkpoint_name="model.ckpt")
    prefix = manager.save(checkpoint_number=step)
    saved = os.path.join(os.path.dirname(checkpoint), checkpoints.HPARAMS_FILE)
    if os.path.exists(saved):
        shutil.copyfile(saved, os.path.join(output_dir, checkpoints.HPARAMS_FILE))
    return prefix


def main(argv: list[str]) -> None:
    del argv
    try:
        print(export_weights(FLAGS.checkpoint, FLAGS.output_dir, FLAGS.model, FLAGS.dataset,
                             FLAGS.num_targets))
    except (ValueError, FileNotFoundError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "The training checkpoint to export.", required=True)
    flags.DEFINE_string("output_dir", None, "Where to write the weights.", required=True)
    flags.DEFINE_enum("model", "capsule", ["capsule", "baseline"], "The model.")
    flags.DEFINE_enum("dataset", "mnist", ["mnist", "norb", "cifar10"], "The data set.")
    flags.DEFINE_integer("num_targets", 1, "1, or 2 for MultiMNIST.")
    app.run(main)
