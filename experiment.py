"""Train, validate and test capsule models: the reference's experiment.py on TensorFlow 2.

Examples:
  python experiment.py --data_dir=data/mnist --summary_dir=runs/mnist --max_steps=30000
  python experiment.py --data_dir=data/mnist --train=false \
      --checkpoint=checkpoints/mnist/model.ckpt-N
  python experiment.py --data_dir=DIR --train=false --num_trials=7 --dataset=cifar10 \
      --checkpoint=DIR/cifar{}/model.ckpt-600000 \
      --hparams_override=num_prime_capsules=64,padding=SAME,leaky=true,remake=false
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The reference's flags (same names, defaults and meanings) and a few additions."""
    flags.DEFINE_string("data_dir", None, "The data directory (MultiMNIST: PREFIX@N).")
    flags.DEFINE_integer("eval_size", 10000, "Size of the test dataset.", lower_bound=1)
    flags.DEFINE_string(
        "hparams_override", None,
        "A string of form key=value,key=value to override the hparams of this experiment.",
    )
    flags.DEFINE_integer("max_steps", 1000, "Number of steps to train.", lower_bound=0)
    flags.DEFINE_enum("model", "capsule", ["capsule", "baseline"], "The model to use.")
    flags.DEFINE_enum("dataset", "mnist", ["mnist", "norb", "cifar10"], "The dataset to use.")
    flags.DEFINE_integer("num_gpus", 1, "Number of GPUs to train on (testing uses one device).",
                         lower_bound=0)
    flags.DEFINE_integer("num_targets", 1, "Number of targets to detect (1 or 2).",
                         lower_bound=1, upper_bound=2)
    flags.DEFINE_integer("num_trials", 1, "Number of trials for ensemble evaluation.",
                         lower_bound=1)
    flags.DEFINE_integer("save_step", 1500, "How often to save checkpoints.", lower_bound=1)
    flags.DEFINE_string("summary_dir", None, "Main directory for the experiments.")
    flags.DEFINE_string(
        "checkpoint", None,
        "The model checkpoint for evaluation; with --num_trials > 1 a pattern with {} for "
        "the trial number.",
    )
    flags.DEFINE_bool("train", True, "Either train the model or test the model.")
    flags.DEFINE_bool("validate", False, "Run training/eval in validation mode.")
    # Additions to the reference's flags.
    flags.DEFINE_integer(
        "random_shift", 0,
        "MNIST training: shift the unshifted training records at random within +-N pixels "
        "instead of reading the 1.3 GB 2-shifted file (0: read the reference's file).",
        lower_bound=0,
    )
    flags.DEFINE_bool("distort", False, "MNIST: random 24x24 crops and rotations.")
    flags.DEFINE_integer("batch_size", 128, "Training batch size (the reference's 128).",
                         lower_bound=1)
    flags.DEFINE_integer("seed", None, "Seed of the input shuffling and transforms.")
    flags.DEFINE_integer("eval_interval_secs", 60,
                         "Continuous evaluation: seconds between looks for a new checkpoint.",
                         lower_bound=1)
    flags.DEFINE_integer("eval_timeout_secs", 6 * 3600,
                         "Continuous evaluation: stop after this long without a new checkpoint.",
                         lower_bound=0)
    flags.DEFINE_bool(
        "mixed_bfloat16", False,
        "Keras' 'mixed_bfloat16' policy: convolutions and votes in bfloat16, routing, "
        "lengths, decoder and losses in float32, weights float32 (checkpoints unchanged). "
        "About 1.75x faster training on a CPU with AVX512-BF16; see README 'Speed'.",
    )


class UsageError(ValueError):
    """A flag or input the user must change; printed in one line, without traceback."""


def _hparams(checkpoint: str | None):
    from capsules.checkpoints import checkpoint_hparams

    try:
        return checkpoint_hparams(checkpoint, FLAGS.hparams_override)
    except ValueError as error:
        raise UsageError(f"--hparams_override: {error}") from None


def _strategy():
    import tensorflow as tf

    if FLAGS.num_gpus <= 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) < FLAGS.num_gpus:
        raise UsageError(f"--num_gpus={FLAGS.num_gpus}: this machine has {len(gpus)} GPU(s)")
    return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(FLAGS.num_gpus)])


def _inputs(split: str, batch_size: int, repeat: bool = False):
    import input_data

    if not FLAGS.data_dir:
        raise UsageError("--data_dir is required (see README.md, 'Data')")
    return input_data.inputs(
        FLAGS.dataset, split, FLAGS.data_dir, batch_size, num_targets=FLAGS.num_targets,
        validate=FLAGS.validate, distort=FLAGS.distort,
        random_shift=FLAGS.random_shift if split == "train" else 0, repeat=repeat,
        seed=FLAGS.seed,
    )


def _model(hparams):
    import input_data
    from capsules.models import build_model

    info = input_data.dataset_info(FLAGS.dataset, FLAGS.num_targets, FLAGS.distort)
    return build_model(FLAGS.model, hparams, info)


def run_training() -> None:
    from capsules import training

    if not FLAGS.summary_dir:
        raise UsageError("--summary_dir is required for training")
    hparams = _hparams(None)
    strategy = _strategy()
    with strategy.scope():
        model = _model(hparams)
        model.compile()
    print(f"total_params: {model.count_params()}")
    dataset = _inputs("train", FLAGS.batch_size, repeat=True)
    config = {
        name: FLAGS[name].value
        for name in ("model", "dataset", "num_targets", "random_shift", "distort", "batch_size",
                     "validate", "seed", "mixed_bfloat16")
    }
    training.train(
        model, dataset, os.path.join(FLAGS.summary_dir, "train"), FLAGS.max_steps,
        FLAGS.save_step, FLAGS.batch_size, strategy=strategy, extra_config=config,
    )


def _test_result(model, checkpoint: str):
    from capsules import checkpoints, evaluation

    checkpoints.restore_weights(model, checkpoint)
    logits, labels = evaluation.collect_logits(model, _inputs("test", 100), FLAGS.eval_size)
    return evaluation.score(logits, labels, FLAGS.num_targets)


def _write_test_summary(result, step: int) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(os.path.join(FLAGS.summary_dir, "test"))
    with writer.as_default():
        tf.summary.scalar("correct_prediction", result.total - result.wrong, step=step)
        tf.summary.scalar("wrong_prediction", result.wrong, step=step)
        tf.summary.scalar("almost_wrong_prediction", result.almost_wrong, step=step)
        tf.summary.scalar("accuracy", result.accuracy, step=step)
    writer.close()


def run_evaluation() -> None:
    """Evaluates --checkpoint once, or each new checkpoint of summary_dir/train."""
    import tensorflow as tf

    from capsules import checkpoints

    if FLAGS.checkpoint:
        model = _model(_hparams(FLAGS.checkpoint))
        result = _test_result(model, FLAGS.checkpoint)
        print(result.report(FLAGS.num_targets))
        if FLAGS.summary_dir:
            _write_test_summary(result, checkpoints.checkpoint_step(FLAGS.checkpoint))
        return
    if not FLAGS.summary_dir:
        raise UsageError("--train=false needs --checkpoint, or --summary_dir to watch")
    train_dir = os.path.join(FLAGS.summary_dir, "train")
    seen, last_new = None, time.monotonic()
    while time.monotonic() - last_new <= FLAGS.eval_timeout_secs:
        latest = tf.train.latest_checkpoint(train_dir)
        if latest is None or latest == seen:
            time.sleep(FLAGS.eval_interval_secs)
            continue
        seen, last_new = latest, time.monotonic()
        result = _test_result(_model(_hparams(latest)), latest)
        print(f"{latest}:\n{result.report(FLAGS.num_targets)}", flush=True)
        _write_test_summary(result, checkpoints.checkpoint_step(latest))


def run_ensemble() -> None:
    """Sums the logits of --num_trials checkpoints (the reference's evaluate_ensemble)."""
    from capsules import checkpoints, evaluation

    if not FLAGS.checkpoint or "{}" not in FLAGS.checkpoint:
        raise UsageError("--num_trials > 1 needs --checkpoint with {} for the trial number")
    paths = [FLAGS.checkpoint.format(trial) for trial in range(FLAGS.num_trials)]
    for path in paths:
        checkpoints.require_checkpoint(path)
    model = _model(_hparams(None))
    dataset = _inputs("test", 100).cache()
    per_trial, labels = [], None
    for path in paths:
        checkpoints.restore_weights(model, path)
        logits, labels = evaluation.collect_logits(model, dataset, FLAGS.eval_size)
        per_trial.append(logits)
    result = evaluation.score(evaluation.ensemble_logits(per_trial), labels, FLAGS.num_targets)
    print(result.report(FLAGS.num_targets))


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import keras

    from capsules.training import NonFiniteLossError

    # Once for the run: every model built from here on takes this policy.
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if FLAGS.mixed_bfloat16 else "float32")
    try:
        if FLAGS.train:
            run_training()
        elif FLAGS.num_trials > 1:
            run_ensemble()
        else:
            run_evaluation()
    except (UsageError, ValueError, FileNotFoundError, NonFiniteLossError) as error:
        print(f"experiment.py: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
