"""experiment.py under fault injection, its runs in-process on the tiny records of
test_experiment.py: damaged record files and checkpoints, two trainings on one directory, a
kill leaving the lock behind, a garbled state file, changed hparams on resume, unwritable
folders, bad learning rates and the data stream of a resumed run. In subprocesses only what
needs them: the training killed with -9 and the command line's one-line error.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from capsules.errors import UsageError
from capsules.export import export_weights
from input_data.mnist import mnist_shift
from input_data.mnist.record_names import record_name
from tests import test_experiment
from tests.test_experiment import (
    ENV,
    ERROR_PREFIX,
    ROOT,
    SMALL,
    TIMEOUT,
    error_line,
    experiment_cli,
    report,
    run,
    saved_steps,
    summaries,
)

data = test_experiment.data  # the tiny MNIST records (a module-scoped fixture)
TRAIN_FILE = record_name("train", 2)
TEST_FILE = record_name("test", 0)


def _train_args(data_dir, summary_dir, *extra) -> list[str]:
    return [f"--data_dir={data_dir}", f"--summary_dir={summary_dir}", "--batch_size=4",
            f"--hparams_override={SMALL},remake=false", *extra]


def usage_error(*args: str) -> str:
    """The one-line UsageError message of experiment.run(ARGS)."""
    with pytest.raises(UsageError) as raised:
        run(*args)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """2 steps saved at each step: a checkpoint to evaluate and damage copies of."""
    summary_dir = tmp_path_factory.mktemp("run")
    run(*_train_args(data["dir"], summary_dir, "--max_steps=2", "--save_step=1"))
    return {"train_dir": summary_dir / "train"}


def _copy_files(source, target):
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


def _damaged_copy(source, target, name: str, damage: str):
    """A copy of the data folder `source` in `target` whose file `name` is damaged."""
    _copy_files(source, target)
    path = target / name
    content = path.read_bytes()
    if damage == "corrupt":
        path.write_bytes(content[:100] + b"\xff\xff\xff\xff" + content[104:])
    elif damage == "truncated":
        path.write_bytes(content[: len(content) * 2 // 3])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    elif damage == "wrongly_sized":  # a whole record, of a 20x20 image
        with tf.io.TFRecordWriter(str(path)) as writer:
            writer.write(mnist_shift.single_example(np.zeros((20, 20), np.uint8), 3))
    elif damage == "not_records":
        path.write_bytes(b"not a record file")
    return target


DAMAGES = {"corrupt": "corrupted record", "truncated": "truncated record",
           "empty": "is empty (0 bytes)", "folder": "is a folder",
           "wrongly_sized": "feature height is missing or not 28",
           "not_records": "record"}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_test_file_is_one_line_naming_it_and_no_figure(data, trained, tmp_path,
                                                               damage, capsys):
    data_dir = _damaged_copy(data["dir"], tmp_path / "data", TEST_FILE, damage)
    message = usage_error(f"--data_dir={data_dir}", "--train=false",
                          f"--checkpoint={trained['train_dir']}", "--eval_size=8")
    assert message.startswith(f"{data_dir / TEST_FILE}"), message
    assert DAMAGES[damage] in message, message
    assert "Total wrong" not in capsys.readouterr().out  # no figure from part of the file


@pytest.mark.parametrize("damage", ["corrupt", "wrongly_sized"])
def test_damaged_training_file_is_one_line_naming_it(data, tmp_path, damage):
    data_dir = _damaged_copy(data["dir"], tmp_path / "data", TRAIN_FILE, damage)
    message = usage_error(*_train_args(data_dir, tmp_path / "run", "--max_steps=2"))
    assert message.startswith(f"{data_dir / TRAIN_FILE}: "), message
    assert DAMAGES[damage] in message, message
    assert saved_steps(tmp_path / "run" / "train") == []


@pytest.mark.parametrize("damage", ["truncated_data", "garbage_index", "garbage_run_file"])
def test_damaged_checkpoint_is_one_line_in_evaluation_and_export(data, trained, tmp_path,
                                                                 damage):
    train_dir = _copy_files(trained["train_dir"], tmp_path / "train")
    name = {"truncated_data": "model.ckpt-2.data-00000-of-00001",
            "garbage_index": "model.ckpt-2.index", "garbage_run_file": "hparams.json"}[damage]
    content = (train_dir / name).read_bytes()
    (train_dir / name).write_bytes(content[: len(content) // 2] if damage == "truncated_data"
                                   else b"garbage" * 10)
    checkpoint = train_dir / "model.ckpt-2"
    expected = (f"{train_dir / name} cannot be read" if damage == "garbage_run_file" else
                f"checkpoint {checkpoint} cannot be read")
    message = usage_error(f"--data_dir={data['dir']}", "--train=false",
                          f"--checkpoint={checkpoint}", "--eval_size=8")
    assert message.startswith(expected), message
    with pytest.raises(UsageError, match=expected):
        export_weights(str(checkpoint), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("form", ["folder", "index"])
def test_checkpoint_flag_takes_a_folder_or_an_index_file(data, trained, form):
    path = trained["train_dir"] if form == "folder" else trained["train_dir"] / "model.ckpt-2.index"
    result, stdout = run(f"--data_dir={data['dir']}", "--train=false", f"--checkpoint={path}",
                         "--eval_size=5")
    assert result.total == 5 and report(stdout)["total"] == 5


@pytest.mark.slow
def test_unwritable_folders_are_one_line_on_the_command_line(data, trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = error_line(experiment_cli(*_train_args(data["dir"], blocker / "run",
                                                  "--max_steps=1")))
    assert line.startswith(f"{ERROR_PREFIX}{blocker / 'run' / 'train'} cannot be written to"), \
        line
    exported = subprocess.run(
        [sys.executable, "-m", "capsules.export", f"--checkpoint={trained['train_dir']}",
         f"--output_dir={blocker / 'out'}"], cwd=ROOT, env=ENV, capture_output=True,
        text=True, timeout=TIMEOUT)
    assert exported.returncode == 1, exported.stderr[-2000:]
    last = exported.stderr.strip().splitlines()[-1]
    assert last.startswith("export: error: ") and str(blocker) in last, exported.stderr[-2000:]


@pytest.mark.parametrize("rate", ["inf", "nan", "0", "-1"])
def test_bad_learning_rates_are_refused(data, tmp_path, rate):
    message = usage_error(*_train_args(data["dir"], tmp_path / "run", "--max_steps=1",
                                       f"--hparams_override={SMALL},learning_rate={rate}"))
    assert "--hparams_override: hparam learning_rate=" in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_second_training_on_a_directory_stops_and_a_killed_ones_lock_does_not_block(
        data, tmp_path, capfd):
    summary_dir = tmp_path / "run"
    lock = summary_dir / "train" / "run.lock"
    args = _train_args(data["dir"], summary_dir, "--save_step=1000")
    with open(tmp_path / "log", "w") as log:
        first = subprocess.Popen([sys.executable, "experiment.py", *args, "--max_steps=100000"],
                                 cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert first.poll() is None, (tmp_path / "log").read_text()[-3000:]
            message = usage_error(*args, "--max_steps=2")
            assert f"in use by process {first.pid} on " in message, message
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert lock.exists()  # left behind by the killed run
    capfd.readouterr()
    run(*args, "--max_steps=2")
    assert "taking over the lock" in capfd.readouterr().err
    assert saved_steps(summary_dir / "train") == [2] and not lock.exists()


@pytest.mark.slow
def test_garbled_state_file_resumes_from_the_newest_checkpoint(data, tmp_path, capfd):
    args = _train_args(data["dir"], tmp_path, "--save_step=2")
    run(*args, "--max_steps=4")
    train_dir = tmp_path / "train"
    (train_dir / "checkpoint").write_text("garbage !!")
    before = set(train_dir.glob("events.out.tfevents.*"))
    capfd.readouterr()
    run(*args, "--max_steps=6")
    assert "rewritten to resume from" in capfd.readouterr().err
    assert saved_steps(train_dir) == [2, 4, 6]
    (tags,) = [tags for path, tags in summaries(train_dir).items() if path not in before]
    assert sorted(tags["loss"]) == [5, 6]  # resumed at 4, not started over


@pytest.mark.slow
def test_resume_with_other_hparams_stops_unless_allowed(data, tmp_path):
    run(*_train_args(data["dir"], tmp_path, "--max_steps=1"))
    changed = _train_args(data["dir"], tmp_path, "--max_steps=2",
                          f"--hparams_override={SMALL},remake=false,learning_rate=0.002")
    message = usage_error(*changed)
    assert "resuming at step 1 with other settings than the run's (learning_rate: 0.001 -> " \
           "0.002)" in message, message
    assert saved_steps(tmp_path / "train") == [1]
    run(*changed, "--allow_hparams_change")
    content = json.loads((tmp_path / "train" / "hparams.json").read_text())
    assert content["hparams"]["learning_rate"] == 0.002
    assert content["resumed_with_changes"] == [
        {"step": 1, "changes": {"learning_rate": [0.001, 0.002]}}]
    assert saved_steps(tmp_path / "train") == [1, 2]


def _input_images(train_dir) -> dict[int, np.ndarray]:
    """{step: the input images of the step's batch}, from the reconstruction summaries
    (input | target | reconstruction side by side, written with each checkpoint)."""
    out = {}
    for path in sorted(train_dir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "reconstruction":
                    pngs = tf.make_ndarray(value.tensor)[2:]
                    images = np.stack([tf.io.decode_png(png).numpy() for png in pngs])
                    out[event.step] = images[:, :, : images.shape[2] // 3]
    return out


@pytest.mark.slow
def test_resumed_seeded_run_trains_on_the_batches_an_unbroken_run_would(data, tmp_path):
    def images(summary_dir, *max_steps):
        for steps in max_steps:
            run(f"--data_dir={data['dir']}", f"--summary_dir={summary_dir}", "--batch_size=4",
                f"--hparams_override={SMALL}", "--seed=3", "--save_step=1",
                f"--max_steps={steps}")
        return _input_images(summary_dir / "train")

    unbroken = images(tmp_path / "unbroken", 4)
    resumed = images(tmp_path / "resumed", 2, 4)
    assert sorted(unbroken) == sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        np.testing.assert_array_equal(resumed[step], unbroken[step])
    assert not np.array_equal(resumed[3], resumed[1])  # the stream goes on, not replayed
