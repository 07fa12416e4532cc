"""Fault injection on a training directory: killed runs' leftovers, a damaged or lying
`checkpoint` state file, damaged and NaN checkpoints, two runs on one directory, changed
settings on resume, retention, and the data stream of a resumed run.

In process, on a variable or a 12x12 CapsNet, so each test takes about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import input_data
from capsules import CapsNet, checkpoints, default_hparams, run_dir, training
from capsules.em_hparams import EMHParams
from capsules.run_dir import RunDirectoryError
from input_data import records
from input_data.mnist import mnist_shift

# ---- lock ------------------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_run_on_a_locked_directory_stops_naming_the_owner(tmp_path):
    with run_dir.locked(str(tmp_path)) as lock:
        with open(lock) as handle:
            owner = json.load(handle)
        assert owner["pid"] == os.getpid()
        with (pytest.raises(RunDirectoryError,
                            match=rf"in use by process {os.getpid()} on {owner['host']}"),
              run_dir.locked(str(tmp_path))):
            pass
        assert os.path.exists(lock)  # the refused run did not remove the owner's lock
    assert not os.path.exists(lock)  # released


@pytest.mark.parametrize("content", ["dead", "garbled", "other_boot"])
def test_lock_of_a_process_that_is_gone_does_not_block(tmp_path, content, capsys):
    lock = tmp_path / run_dir.LOCK_FILE
    owner = {"pid": _dead_pid(), "host": os.uname().nodename, "boot_id": run_dir._boot_id()}
    if content == "garbled":
        lock.write_text('{"pid": 12')  # killed while writing
    else:
        if content == "other_boot":
            owner.update(pid=os.getppid(), boot_id="another-boot")  # a live pid, reused
        lock.write_text(json.dumps(owner))
    with run_dir.locked(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().err
    assert not lock.exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_lock_of_a_live_process_on_another_host_blocks(tmp_path):
    (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps(
        {"pid": _dead_pid(), "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}))
    with (pytest.raises(RunDirectoryError, match="on elsewhere .since 2026-01-01"),
          run_dir.locked(str(tmp_path))):
        pass


def test_unwritable_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("")
    with (pytest.raises(RunDirectoryError, match="cannot be written to: Not a directory")
          as raised, run_dir.locked(str(tmp_path / "file" / "train"))):
        pass
    assert "\n" not in str(raised.value)


# ---- leftovers -------------------------------------------------------------------------

def test_leftovers_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    keep = ["model.ckpt-4.index", "model.ckpt-4.data-00000-of-00001", "checkpoint",
            "hparams.json", "events.out.tfevents.1795.vm.1.v2", "notes.tmp.txt"]
    leftovers = ["hparams.json.tmp4242", "train.tfrecords.tmp-17",
                 "checkpoint.tmp0d5f3b9a8e7c4c2e9f3c1b7a6d5e4f3a"]
    for name in keep + leftovers:
        (tmp_path / name).write_text("x")
    (tmp_path / "model.ckpt-6_temp" / "part").mkdir(parents=True)
    (tmp_path / "model.ckpt-6_temp" / "part" / "x.data-00000-of-00001").write_text("x")
    removed = run_dir.remove_leftovers(str(tmp_path))
    assert sorted(os.path.basename(path) for path in removed) == sorted(
        [*leftovers, "model.ckpt-6_temp"])
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_atomic_writers_remove_what_a_killed_writer_of_the_same_file_left(tmp_path):
    target = tmp_path / "train-images-idx3-ubyte"
    killed = tmp_path / f"{target.name}.tmp-{_dead_pid()}"
    running = tmp_path / f"{target.name}.tmp-{os.getppid()}"  # another live writer's
    other = tmp_path / f"other.tmp-{_dead_pid()}"
    for path in (killed, running, other):
        path.write_bytes(b"half written")
    with records.atomic_paths([str(target)]) as (temporary,), open(temporary, "wb") as handle:
        handle.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert not killed.exists() and running.exists() and other.exists()


# ---- resume from the newest good checkpoint --------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """Checkpoints 2, 4, 6 of a variable holding its step, and a restore into it."""
    variable = tf.Variable(tf.zeros([64]))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), str(tmp_path),
                                         max_to_keep=None, checkpoint_name="model.ckpt")
    for step in (2, 4, 6):
        variable.assign(tf.fill([64], float(step)))
        manager.save(checkpoint_number=step)
    variable.assign(tf.zeros([64]))

    def restore():
        path = run_dir.restore_newest(tf.train.Checkpoint(v=variable), str(tmp_path),
                                      [variable])
        return path, float(variable[0])

    return tmp_path, restore


def _state(directory) -> list[str]:
    state = tf.train.get_checkpoint_state(str(directory))
    return [os.path.basename(path) for path in state.all_model_checkpoint_paths]


@pytest.mark.parametrize("damage", ["garbled", "empty", "deleted", "names_missing",
                                    "oldest_half_swept"])
def test_resume_finds_the_newest_complete_checkpoint_whatever_the_state_file(saved, damage,
                                                                            capsys):
    directory, restore = saved
    state = directory / "checkpoint"
    if damage == "garbled":
        state.write_bytes(b"garbage !!\x00\x01")
    elif damage == "empty":
        state.write_text("")
    elif damage == "deleted":
        state.unlink()
    elif damage == "names_missing":  # the newest checkpoint's files deleted, still named
        for path in directory.glob("model.ckpt-6.*"):
            path.unlink()
    else:  # killed inside CheckpointManager.save, which lists a new checkpoint before it
        # deletes the oldest: the state file names one whose files are partly deleted
        (directory / "model.ckpt-2.index").unlink()
    newest = 4 if damage == "names_missing" else 6
    path, value = restore()
    assert path == str(directory / f"model.ckpt-{newest}") and value == newest
    assert _state(directory)[-1] == f"model.ckpt-{newest}"  # repaired
    if damage == "oldest_half_swept":
        assert _state(directory) == ["model.ckpt-4", "model.ckpt-6"]
    assert "rewritten to resume from" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated_index", "truncated_data", "corrupt_index"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(saved, damage, capsys):
    directory, restore = saved
    name = "model.ckpt-6." + ("index" if "index" in damage else "data-00000-of-00001")
    data = (directory / name).read_bytes()
    damaged = b"\xff" * 64 + data[64:] if damage == "corrupt_index" else data[: len(data) // 2]
    (directory / name).write_bytes(damaged)
    path, value = restore()
    assert (path, value) == (str(directory / "model.ckpt-4"), 4)
    assert "model.ckpt-6 cannot be read" in capsys.readouterr().err
    assert _state(directory) == ["model.ckpt-2", "model.ckpt-4"]


def test_nan_checkpoint_is_skipped(saved, capsys):
    directory, restore = saved
    variable = tf.Variable(tf.fill([64], np.nan))
    tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), str(directory), max_to_keep=None,
                               checkpoint_name="model.ckpt").save(checkpoint_number=8)
    assert restore() == (str(directory / "model.ckpt-6"), 6)
    assert "model.ckpt-8 holds NaN or infinite weights" in capsys.readouterr().err


def test_no_restorable_checkpoint_stops_instead_of_starting_over(saved):
    directory, restore = saved
    for path in directory.glob("model.ckpt-*.data-*"):
        path.write_bytes(b"")
    with pytest.raises(RunDirectoryError, match=r"no checkpoint of .* can be restored"):
        restore()
    assert len(list(directory.glob("model.ckpt-*.index"))) == 3  # nothing removed


def test_only_incomplete_checkpoints_stop_too(saved):
    directory, restore = saved
    for path in directory.glob("model.ckpt-*.data-*"):
        path.unlink()
    with pytest.raises(RunDirectoryError, match="incomplete: model.ckpt-"):
        restore()


@pytest.mark.parametrize("write", [True, False])
def test_empty_or_absent_directory_restores_nothing(tmp_path, write):
    variable = tf.Variable(1.0)
    assert run_dir.restore_newest(tf.train.Checkpoint(v=variable), str(tmp_path),
                                  [variable], write) is None
    # A worker that is not the chief may look before the chief made the directory.
    assert run_dir.restore_newest(tf.train.Checkpoint(v=variable), str(tmp_path / "train"),
                                  [variable], write) is None
    assert not (tmp_path / "train").exists()


# ---- --checkpoint given a folder, an .index or a .data file ------------------------------

def test_resolve_checkpoint_accepts_folders_and_file_names(saved):
    directory, _ = saved
    newest = str(directory / "model.ckpt-6")
    assert checkpoints.resolve_checkpoint(str(directory)) == newest
    assert checkpoints.resolve_checkpoint(newest + ".index") == newest
    assert checkpoints.resolve_checkpoint(newest + ".data-00000-of-00001") == newest
    assert checkpoints.resolve_checkpoint(newest) == newest
    (directory / "checkpoint").write_text("garbage")
    assert checkpoints.resolve_checkpoint(str(directory)) == newest
    (directory / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        checkpoints.resolve_checkpoint(str(directory / "empty"))
    with pytest.raises(FileNotFoundError, match="model.ckpt-5 not found"):
        checkpoints.resolve_checkpoint(str(directory / "model.ckpt-5.index"))


def test_restoring_a_damaged_checkpoint_is_a_one_line_error(tmp_path):
    model = CapsNet(default_hparams().replace(num_prime_capsules=2, routing=1, remake=False,
                                              padding="SAME"),
                    input_shape=(12, 12, 1), num_classes=3)
    model(np.zeros((1, 12, 12, 1), np.float32))
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "model.ckpt-3"))
    data = tmp_path / "model.ckpt-3.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint .*model.ckpt-3 cannot be read .*damaged"):
        checkpoints.restore_weights(model, prefix)


# ---- the run file ------------------------------------------------------------------------

def test_resume_with_other_settings_stops_listing_them_or_records_them(tmp_path):
    content = {"model": "capsule",
               "config": {"input_shape": [28, 28, 1], "num_classes": 10, "name": "caps_net"},
               "hparams": default_hparams().to_dict(),
               "flags": {"batch_size": 128, "seed": None, "max_steps": 10, "summary_dir": "a"}}
    checkpoints.write_json_atomically(str(tmp_path / checkpoints.RUN_FILE), content)
    changed = {**content, "hparams": {**content["hparams"], "routing": 1},
               "flags": {**content["flags"], "batch_size": 64}}
    with pytest.raises(RunDirectoryError,
                       match=r"resuming at step 30 .*\(batch_size: 128 -> 64, routing: 3 -> 1\)"):
        run_dir.resumed_config(str(tmp_path), changed, step=30)
    # Flags that do not change what is trained (max_steps, folders) may change.
    free = {**content, "flags": {**content["flags"], "max_steps": 99, "summary_dir": "b"}}
    assert run_dir.resumed_config(str(tmp_path), free, step=30) == free
    allowed = run_dir.resumed_config(str(tmp_path), changed, step=30, allow_changes=True)
    assert allowed[run_dir.CHANGES_KEY] == [
        {"step": 30, "changes": {"batch_size": [128, 64], "routing": [3, 1]}}]
    checkpoints.write_json_atomically(str(tmp_path / checkpoints.RUN_FILE), allowed)
    again = run_dir.resumed_config(str(tmp_path), changed, step=40)  # history kept
    assert again[run_dir.CHANGES_KEY] == allowed[run_dir.CHANGES_KEY]
    assert run_dir.resumed_config(str(tmp_path), content, step=0) == content  # a new run
    # An older run file (flags at the top level, no model config).
    older = {"hparams": default_hparams().to_dict(), "batch_size": 32, "dataset": "mnist"}
    checkpoints.write_json_atomically(str(tmp_path / checkpoints.RUN_FILE), older)
    with pytest.raises(RunDirectoryError, match=r"\(batch_size: 32 -> 128\)"):
        run_dir.resumed_config(str(tmp_path), content, step=30)
    # An EM run file from before the weights' moving average trained without one.
    em = {"model": "em", "hparams": EMHParams().to_dict(), "flags": {}}
    before = {**em, "hparams": {key: value for key, value in em["hparams"].items()
                                if key != "ema_momentum"}}
    checkpoints.write_json_atomically(str(tmp_path / checkpoints.RUN_FILE), before)
    with pytest.raises(RunDirectoryError, match=r"\(ema_momentum: 0.0 -> 0.99\)"):
        run_dir.resumed_config(str(tmp_path), em, step=30)
    without = {**em, "hparams": EMHParams(ema_momentum=0.0).to_dict()}
    assert run_dir.resumed_config(str(tmp_path), without, step=30) == without


# ---- training ----------------------------------------------------------------------------

def _model(**overrides) -> CapsNet:
    hparams = default_hparams().replace(**{"padding": "SAME", "num_prime_capsules": 2,
                                           "routing": 1, "remake": False, **overrides})
    model = CapsNet(hparams, input_shape=(12, 12, 1), num_classes=3)
    model.compile()
    return model


def _dataset() -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.random((4, 12, 12, 1)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    features = {"images": images, "labels": labels, "recons_image": images,
                "recons_label": np.array([0, 1, 2, 0], np.int32)}
    return tf.data.Dataset.from_tensors(features).repeat()


def _train(model, train_dir, max_steps, **kwargs) -> int:
    return training.train(model, _dataset(), str(train_dir), max_steps, kwargs.pop("save_step", 1),
                          4, verbose=False, **kwargs)


def _steps(train_dir) -> list[int]:
    return [checkpoints.checkpoint_step(path)
            for path in checkpoints.complete_checkpoints(str(train_dir))]


@pytest.mark.slow
def test_weights_made_nan_by_a_step_are_never_saved_and_a_rerun_resumes(tmp_path):
    model = _model()
    step_with_nan = 3
    original = model.optimize_step

    def poisoned(data):  # the loss is finite, the update poisons the weights
        results = original(data)
        poison = tf.where(model.optimizer.iterations >= step_with_nan, np.nan, 1.0)
        model.conv1.kernel.assign(model.conv1.kernel * poison)
        return results

    model.optimize_step = poisoned
    with pytest.raises(training.NonFiniteLossError) as raised:
        _train(model, tmp_path, 10)
    good = str(tmp_path / f"model.ckpt-{step_with_nan - 1}")
    assert str(raised.value).endswith(f"the last good checkpoint is {good}")
    assert f"after step {step_with_nan}" in str(raised.value)
    assert _steps(tmp_path) == [1, 2]
    reader = tf.train.load_checkpoint(good)
    floats = [name for name, dtype in reader.get_variable_to_dtype_map().items()
              if dtype.is_floating]
    assert len(floats) > 10
    for name in floats:
        assert np.all(np.isfinite(reader.get_tensor(name))), name
    rerun = _model()
    assert _train(rerun, tmp_path, 2) == 2  # resumes from it: nothing left to do
    assert _train(rerun, tmp_path, 4) == 4


@pytest.mark.slow
def test_training_keeps_the_newest_checkpoints_and_removes_leftovers(tmp_path):
    (tmp_path / "model.ckpt-9_temp").mkdir(parents=True)
    (tmp_path / "hparams.json.tmp99999").write_text("{")
    _train(_model(), tmp_path, 5, keep_checkpoints=2)
    assert _steps(tmp_path) == [4, 5]
    assert _state(tmp_path) == ["model.ckpt-4", "model.ckpt-5"]
    assert not (tmp_path / "model.ckpt-9_temp").exists()
    assert not (tmp_path / "hparams.json.tmp99999").exists()
    assert not (tmp_path / run_dir.LOCK_FILE).exists()
    (tmp_path / "checkpoint").write_text("garbage")  # rebuilt, and retention goes on
    _train(_model(), tmp_path, 6, keep_checkpoints=2)
    assert _steps(tmp_path) == [5, 6] and _state(tmp_path) == ["model.ckpt-5", "model.ckpt-6"]
    _train(_model(), tmp_path, 8, keep_checkpoints=None)
    assert _steps(tmp_path) == [5, 6, 7, 8]


def test_training_in_a_locked_directory_stops(tmp_path):
    with run_dir.locked(str(tmp_path)), pytest.raises(RunDirectoryError, match="in use by"):
        _train(_model(), tmp_path, 1)
    assert _steps(tmp_path) == []


@pytest.mark.slow
def test_training_resumed_with_other_hparams_stops_unless_allowed(tmp_path):
    _train(_model(), tmp_path, 1)
    with pytest.raises(RunDirectoryError, match="learning_rate: 0.001 -> 0.002"):
        _train(_model(learning_rate=0.002), tmp_path, 2)
    # A model the checkpoint does not fit: the differences, not a restore error.
    with pytest.raises(RunDirectoryError, match=r"\(num_prime_capsules: 2 -> 3\)"):
        _train(_model(num_prime_capsules=3), tmp_path, 2)
    assert _steps(tmp_path) == [1]
    _train(_model(learning_rate=0.002), tmp_path, 2, allow_changes=True)
    assert _steps(tmp_path) == [1, 2]
    changes = run_dir.run_config(str(tmp_path))[run_dir.CHANGES_KEY]
    assert changes == [{"step": 1, "changes": {"learning_rate": [0.001, 0.002]}}]


@pytest.mark.slow
def test_training_gets_the_dataset_of_its_restored_step(tmp_path):
    asked = []

    def dataset(step):
        asked.append(step)
        return _dataset()

    for max_steps in (2, 3):
        training.train(_model(), dataset, str(tmp_path), max_steps, 1, 4, verbose=False)
    assert asked == [0, 2]


@pytest.mark.slow
def test_resumed_run_progress_counts_its_own_steps(tmp_path, capsys):
    _train(_model(), tmp_path, 2)
    capsys.readouterr()
    training.train(_model(), _dataset(), str(tmp_path), 5, 1, 4, verbose=True)
    printed = capsys.readouterr().out
    # The bar's time per step and ETA divide by the steps it counted: this run's 3.
    assert "Resuming at step 2, training to step 5." in printed
    assert "3/3" in printed and "/5" not in printed


@pytest.mark.slow
def test_a_seeded_stream_resumed_at_a_step_continues_instead_of_replaying(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    mnist_shift.write_single(pixels, np.arange(12) % 10,
                             str(tmp_path / mnist_shift.record_name("train", 0)), 0, 0)

    def images(skip_steps=0, seed=7, shard=None, count=3):
        data = input_data.inputs("mnist", "train", str(tmp_path), 4, repeat=True, seed=seed,
                                 random_shift=2, skip_steps=skip_steps, shard=shard)
        return [batch["images"].numpy() for batch in data.take(count)]

    stream = images(count=6)
    resumed = images(skip_steps=2)  # resumed after 2 steps
    np.testing.assert_array_equal(resumed[0], stream[2])
    assert not np.array_equal(resumed[0], stream[0])  # not a replay
    # Worker 1 of 2, sharding by data, keeps batches 1, 3, 5, ...: after 2 steps, batch 5.
    np.testing.assert_array_equal(images(skip_steps=2, shard=(2, 1), count=1)[0], stream[5])
    # Without a seed every pipeline draws its own stream: nothing to skip.
    assert len(images(skip_steps=2, seed=None)) == 3
