"""A disk that fills while a checkpoint is saved: one line naming the folder, the previous
checkpoint intact, and the same command resumes from it.

The save is made to fail as TensorFlow's does on a full disk (a ResourceExhaustedError
ending in "No space left on device", measured on a 600 KB tmpfs) after it has begun writing
model.ckpt-STEP_temp/.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import tensorflow as tf

from capsules import CapsNet, checkpoints, default_hparams, errors, training

ENOSPC = "; No space left on device [Op:SaveV2]"


def _model() -> CapsNet:
    hparams = default_hparams().replace(padding="SAME", num_prime_capsules=2, routing=1,
                                        remake=False)
    model = CapsNet(hparams, input_shape=(12, 12, 1), num_classes=3)
    model.compile()
    return model


def _dataset() -> tf.data.Dataset:
    images = np.random.default_rng(0).random((4, 12, 12, 1)).astype(np.float32)
    features = {"images": images, "labels": np.eye(3, dtype=np.float32)[[0, 1, 2, 0]],
                "recons_image": images, "recons_label": np.array([0, 1, 2, 0], np.int32)}
    return tf.data.Dataset.from_tensors(features).repeat()


def _fill_disk_at(monkeypatch, full_step: int, error: Exception) -> None:
    """Makes CheckpointManager.save fail at checkpoint `full_step` after writing part of it."""
    save = tf.train.CheckpointManager.save

    def failing(manager, checkpoint_number=None, **kwargs):
        if checkpoint_number == full_step:
            os.makedirs(os.path.join(manager.directory, f"model.ckpt-{full_step}_temp"))
            raise error
        return save(manager, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", failing)


@pytest.mark.parametrize("error", [
    tf.errors.ResourceExhaustedError(None, None, "{{function_node __wrapped__SaveV2}} "
                                     "run/model.ckpt-2_temp/part-00000-of-00001" + ENOSPC),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["tensorflow", "system"])
def test_a_full_disk_stops_with_one_line_and_the_rerun_resumes(monkeypatch, tmp_path, error):
    train_dir = str(tmp_path / "train")
    _fill_disk_at(monkeypatch, 2, error)
    with pytest.raises(errors.DiskFullError) as raised:
        training.train(_model(), _dataset(), train_dir, 3, 1, 4, verbose=False)
    previous = os.path.join(train_dir, "model.ckpt-1")
    assert str(raised.value) == (
        f"{train_dir}: no space left on the device to save the checkpoint of step 2; free "
        f"some and rerun the same command to resume from {previous}")
    assert errors.error_line(raised.value) == str(raised.value)  # what experiment.py prints
    assert checkpoints.complete_checkpoints(train_dir) == [previous]
    assert not os.path.exists(os.path.join(train_dir, "model.ckpt-2_temp"))  # space freed
    assert tf.train.latest_checkpoint(train_dir) == previous
    monkeypatch.undo()
    rerun = _model()
    assert training.train(rerun, _dataset(), train_dir, 3, 1, 4, verbose=False) == 3
    assert checkpoints.complete_checkpoints(train_dir)[-1] == os.path.join(train_dir,
                                                                           "model.ckpt-3")


def test_other_save_errors_keep_their_traceback(monkeypatch, tmp_path):
    out_of_memory = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    _fill_disk_at(monkeypatch, 1, out_of_memory)
    with pytest.raises(tf.errors.ResourceExhaustedError, match="OOM"):
        training.train(_model(), _dataset(), str(tmp_path), 1, 1, 4, verbose=False)


def test_experiment_prints_a_full_disk_in_one_line(monkeypatch, capsys, tmp_path):
    from tests.test_experiment import main_raising

    full = errors.DiskFullError(f"{tmp_path}/train: no space left on the device")
    with pytest.raises(SystemExit) as stop:
        main_raising(monkeypatch, full)
    assert stop.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"experiment.py: error: {tmp_path}/train: no space left on the device"]
