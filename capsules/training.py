"""Training loop of experiment.py: checkpoints, resumption, summaries and a progress bar.

Behaves as the reference's `train_experiment` (a checkpoint `model.ckpt-STEP`
every save_step, summaries of every step in summary_dir/train) and adds what
a TF2 user expects: a rerun resumes from the latest checkpoint with the
optimizer state, a NaN loss stops training with the last good checkpoint
kept, and the last step is always saved.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from capsules import distribute, run_dir
from capsules import features as keys
from capsules.checkpoints import (
    RUN_FILE,
    checkpoint_step,
    run_file_content,
    write_json_atomically,
)
from capsules.errors import DataReadError, DiskFullError, disk_full, error_line
from capsules.models import CapsNet
from capsules.run_dir import CHECKPOINT_NAME

STOP = "stop"  # the step's result telling whether a worker got SIGTERM


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or weights."""


def checkpoint_manager(model: keras.Model, directory: str, max_to_keep: int | None = None):
    """A `tf.train.CheckpointManager` saving `model` (and its optimizer) as model.ckpt-STEP."""
    checkpoint = tf.train.Checkpoint(model=model)
    return tf.train.CheckpointManager(
        checkpoint, directory, max_to_keep=max_to_keep, checkpoint_name=CHECKPOINT_NAME
    )


def _save(manager: tf.train.CheckpointManager, step: int) -> None:
    """Saves model.ckpt-STEP; a full disk is a DiskFullError naming the directory.

    A save that fails leaves the previous checkpoints and the state file as they were
    (TensorFlow writes model.ckpt-STEP_temp/ and renames it when whole); that leftover is
    removed at once, for the space it holds.
    """
    try:
        manager.save(checkpoint_number=step)
    except (OSError, tf.errors.ResourceExhaustedError) as error:
        if not disk_full(error):
            raise
        run_dir.remove_leftovers(manager.directory)
        raise DiskFullError(
            f"{manager.directory}: no space left on the device to save the checkpoint of step "
            f"{step}; free some and rerun the same command to resume from "
            f"{manager.latest_checkpoint or 'step 0 (no checkpoint yet)'}"
        ) from error


def _reconstruction_summary(model: CapsNet, features: dict, max_images: int = 10) -> tf.Tensor:
    """Input, target and reconstruction side by side `[n, h, 3 * w, depth]`, as the reference's."""
    images = features[keys.IMAGES][:max_images]
    target = features[keys.RECONS_IMAGE][:max_images]
    remake = model.reconstruct(images, features[keys.RECONS_LABEL][:max_images])
    return tf.concat([images, target, remake], axis=2)


def train(
    model: keras.Model,
    dataset: tf.data.Dataset | Callable[[int], tf.data.Dataset],
    train_dir: str,
    max_steps: int,
    save_step: int,
    batch_size: int,
    strategy: tf.distribute.Strategy | None = None,
    run_flags: dict | None = None,
    verbose: bool = True,
    keep_checkpoints: int | None = run_dir.DEFAULT_KEEP,
    allow_changes: bool = False,
) -> int:
    """Trains `model` (compiled) on batches of `dataset` until step max_steps.

    One run at a time per train_dir (`run_dir.locked`, held by the chief of a cluster);
    what killed runs left there is removed first, then the newest checkpoint that reads
    back whole and finite is restored (`run_dir.restore_newest`).

    Args:
      model: a compiled CapsNet or ConvBaseline, built under `strategy`'s scope.
      dataset: repeating dataset of `input_data.inputs` feature dicts, or such batches
        distributed already (`distribute.distributed_inputs`), or a function of the
        restored step returning either (so that a resumed run continues its data stream).
      train_dir: checkpoints model.ckpt-STEP, the run file and summaries go here;
        a latest checkpoint found here is restored first (optimizer state and step).
        Under a multi-worker strategy every worker restores from here and the chief alone
        writes here (`distribute.write_dir`).
      max_steps: the step to stop at (counted from the first run, as the reference).
      save_step: save a checkpoint every save_step steps (and at the last step).
      batch_size: images per step over all replicas (for the images/s figure).
      strategy: distribution strategy the model was built in (default: none).
      run_flags: the run's flags, written to the run file with the model's config
        (`capsules.checkpoints.write_run_file`).
      keep_checkpoints: the newest checkpoints kept (None: all).
      allow_changes: let a resumed run change its model, hparams or settings
        (`run_dir.SETTINGS_FLAGS`; the changes are recorded in the run file); otherwise
        that is a run_dir.RunDirectoryError listing them.

    Returns the last step. Raises NonFiniteLossError on a NaN or infinite loss or
    weights, after which the latest checkpoint in train_dir is the last finite one;
    run_dir.RunDirectoryError for a directory in use, unwritable or beyond repair;
    errors.DiskFullError when the disk fills during a save (the checkpoints before kept);
    distribute.Preempted when a worker got SIGTERM (all saved a checkpoint at the step
    where they stopped); distribute.WorkerLostError when a peer worker stopped.
    """
    strategy = strategy or tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    with (run_dir.locked(train_dir) if chief else contextlib.nullcontext(),
          distribute.write_dir(strategy, train_dir) as own_dir):
        if chief:  # for the whole cluster
            run_dir.remove_leftovers(train_dir)
        return _train(model, dataset, train_dir, own_dir, max_steps, save_step, batch_size,
                      strategy, run_flags, verbose, keep_checkpoints, allow_changes)


def _train(model, dataset, train_dir, own_dir, max_steps, save_step, batch_size, strategy,
           run_flags, verbose, keep_checkpoints, allow_changes) -> int:
    """`train`, writing to own_dir (train_dir on the chief, a temporary one elsewhere)."""
    chief = distribute.is_chief(strategy)
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    # The weights and the optimizer state; not the metrics (on-read variables that a read
    # outside a step would all-reduce across workers).
    checked_variables = model.weights + model.optimizer.variables
    # The settings are checked before restoring: a changed model would not fit. Every
    # worker restores the same checkpoint of train_dir; the chief alone repairs its files.
    newest = run_dir.repair_state(train_dir, write=chief)
    content = run_dir.resumed_config(train_dir, run_file_content(model, run_flags),
                                     checkpoint_step(newest) if newest else 0, allow_changes)
    run_dir.restore_newest(tf.train.Checkpoint(model=model), train_dir, checked_variables,
                           write=chief)
    if chief:
        write_json_atomically(os.path.join(train_dir, RUN_FILE), content)
    manager = checkpoint_manager(model, own_dir, keep_checkpoints if chief else 1)
    step = int(model.optimizer.iterations.numpy())
    if step >= max_steps:
        return step
    if callable(dataset):
        dataset = dataset(step)

    @tf.function
    def distributed_step(features, stop):
        def replica_step(features):
            return {**model.optimize_step(features), STOP: stop}

        results = strategy.run(replica_step, args=(features,))
        return {
            name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
            for name, value in results.items()
        }

    writer = tf.summary.create_file_writer(train_dir) if chief else tf.summary.create_noop_writer()
    progress = None
    if verbose and chief:
        # The bar counts this run's steps: its time per step and ETA then hold after a resume.
        if step:
            print(f"Resuming at step {step}, training to step {max_steps}.")
        progress = keras.utils.Progbar(max_steps - step, stateful_metrics=["loss", "images/s"])
    first_step = step
    if not isinstance(dataset, tf.distribute.DistributedDataset):
        dataset = strategy.experimental_distribute_dataset(dataset)
    batches = iter(dataset)
    with (writer.as_default(), distribute.StopSignal() as stop_signal,
          distribute.peer_errors_as_worker_lost(strategy, train_dir)):
        last_time = time.perf_counter()
        while step < max_steps:
            try:
                features = next(batches)
            except StopIteration:
                raise DataReadError(f"the training data ended at step {step}") from None
            except tf.errors.OpError as error:
                raise DataReadError(error_line(error)) from error
            results = distributed_step(features, tf.constant(float(stop_signal.requested)))
            scalars = {name: float(value) for name, value in results.items()}
            stop = scalars.pop(STOP) > 0
            if not math.isfinite(scalars["loss"]):
                raise NonFiniteLossError(
                    f"loss is {scalars['loss']} at step {step + 1}; training stopped, the last "
                    f"good checkpoint is {manager.latest_checkpoint or 'none (no checkpoint yet)'}"
                )
            step += 1
            for name, value in scalars.items():
                tf.summary.scalar(name, value, step=step)
            tf.summary.scalar(
                "learning_rate", model.optimizer.learning_rate.numpy(), step=step
            )
            if step % save_step == 0 or step == max_steps or stop:
                # The loss above was computed before this step's update: the weights it
                # made are checked too, so that every checkpoint is finite.
                if not run_dir.all_finite(checked_variables):
                    raise NonFiniteLossError(
                        f"weights are NaN or infinite after step {step} (loss "
                        f"{scalars['loss']}); training stopped, the last good checkpoint is "
                        f"{manager.latest_checkpoint or 'none (no checkpoint yet)'}"
                    )
                _save(manager, step)
                if chief and isinstance(model, CapsNet) and model.decoder is not None:
                    local = strategy.experimental_local_results(features)[0]
                    tf.summary.image(
                        "reconstruction", _reconstruction_summary(model, local), step=step,
                        max_outputs=10,
                    )
                writer.flush()
            if progress is not None:
                now = time.perf_counter()
                images_per_second = batch_size / max(now - last_time, 1e-9)
                last_time = now
                progress.update(
                    step - first_step,
                    [("loss", scalars["loss"]), ("images/s", images_per_second)],
                )
            if stop:
                raise distribute.Preempted(
                    f"a worker got SIGTERM: stopped after step {step}, checkpoint "
                    f"{os.path.join(train_dir, f'{CHECKPOINT_NAME}-{step}')} saved; rerun the "
                    "same command to resume"
                )
    return step
