"""Restoring model weights from this package's checkpoints or the reference's TF1 ones."""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from capsules.hparams import HParams, default_hparams, parse_overrides

HPARAMS_FILE = "hparams.json"


def require_checkpoint(path: str) -> None:
    """Raises FileNotFoundError naming `path` unless it is a checkpoint prefix."""
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(f"checkpoint {path} not found (no file {path}.index)")


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint prefix `.../model.ckpt-STEP` (0 without a numeric suffix)."""
    suffix = os.path.basename(path).rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def is_tf1_checkpoint(path: str) -> bool:
    """True for a checkpoint written by the reference's tf.compat.v1 Saver (names by scope)."""
    names = [name for name, _ in tf.train.list_variables(path)]
    return not any(name == "_CHECKPOINTABLE_OBJECT_GRAPH" for name in names)


def has_optimizer_state(path: str) -> bool:
    """True for a checkpoint of this package that holds the optimizer's variables."""
    return any(name.startswith("model/optimizer/") for name, _ in tf.train.list_variables(path))


def restore_weights(model: keras.Model, path: str) -> None:
    """Assigns the weights of checkpoint `path` to the built `model`.

    Accepts this package's checkpoints (tf.train.Checkpoint of the model, with
    or without optimizer state) and the reference's TF1 checkpoints, recognised
    by their variable names (`capsules.tf1_checkpoint`). A compiled model takes
    the optimizer state too where the checkpoint has it; from a weights-only
    checkpoint (as the shipped one) it takes the weights, its optimizer untouched.
    """
    require_checkpoint(path)
    if is_tf1_checkpoint(path):
        from capsules import tf1_checkpoint

        tf1_checkpoint.restore(model, path)
        return
    if getattr(model, "optimizer", None) is not None and not has_optimizer_state(path):
        # The compiled model's optimizer variables would be unmatched: restore into an
        # uncompiled twin, checked the same way, and copy its weights.
        twin = model.__class__.from_config(model.get_config())
        _restore_checked(twin, path)
        model.set_weights(twin.get_weights())
        return
    _restore_checked(model, path)


def _restore_checked(model: keras.Model, path: str) -> None:
    """tf.train.Checkpoint restore of `model`; ValueError unless all its objects matched."""
    try:
        status = tf.train.Checkpoint(model=model).restore(path)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:  # unmatched objects; a shape mismatch
        raise ValueError(
            f"checkpoint {path} does not fit this model ({model.__class__.__name__}, "
            f"{model.hparams}): {str(error).splitlines()[0]}"
        ) from None
    status.expect_partial()


def saved_hparams(checkpoint_path: str) -> HParams | None:
    """The hyper-parameters saved next to a checkpoint by experiment.py, if any."""
    path = os.path.join(os.path.dirname(checkpoint_path), HPARAMS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return HParams(**json.load(handle)["hparams"])


def checkpoint_hparams(checkpoint: str | None, overrides: str | None = None) -> HParams:
    """Hyper-parameters for a model to restore `checkpoint` into.

    Those saved next to the checkpoint (hparams.json), else the reference's
    defaults (e.g. for a TF1 checkpoint), then the "key=value,..." `overrides`.
    Raises ValueError for a bad override.
    """
    saved = saved_hparams(checkpoint) if checkpoint else None
    return parse_overrides(saved or default_hparams(), overrides)
