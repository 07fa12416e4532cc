"""experiment.py on tiny records, its run functions called in-process: training with
checkpoints, the run file, summaries and resumption, a NaN loss, evaluation of one checkpoint
(single digits and MultiMNIST) and of each new one, the ensemble and its run files, export of
a --distort run, and every bad input; in subprocesses only what needs the command line:
kill -9 and resumption, exit codes and one-line errors (a damaged record file among them).

The models are small (--hparams_override=num_prime_capsules=1,routing=1) and the batches
4 images, so that each run takes about a second; the runs are shared between tests by
module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import input_data
from capsules import checkpoints, evaluation, experiment
from capsules.errors import UsageError
from capsules.export import export_weights
from capsules.models import CapsNet
from capsules.training import NonFiniteLossError
from input_data.mnist import idx, mnist_shift
from input_data.mnist.record_names import record_name

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
TIMEOUT = 600  # per subprocess; a few seconds each on an idle machine
NUM_IMAGES = 8
SMALL = "num_prime_capsules=1,routing=1"
# lr(step) = 0.001 * 0.5^step: the logged learning rate tells the optimizer's step count.
DECAYING = f"{SMALL},decay_steps=1,decay_rate=0.5"
ITERATIONS = "model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
ERROR_PREFIX = "experiment.py: error: "
FLAGS_ERROR_PREFIX = "FATAL Flags parsing error: "
ABSL_HINT = "Pass --helpshort or --helpfull to see help on flags."
# TensorFlow's and absl's logging on stderr ("I0000 00:00:... port.cc:153] ...").
LOG_LINE = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog)")


# ---- helpers ----------------------------------------------------------------------------

def run(*args: str):
    """experiment.run of the config of ARGS, in this process; returns (result, stdout)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = experiment.run(experiment.parse_config(args))
    return result, stdout.getvalue()


def experiment_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Runs `python experiment.py ARGS` in the repository root; returns the finished process."""
    result = subprocess.run([sys.executable, "experiment.py", *args], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def message_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's logging lines and blank lines."""
    return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single error line of a failed run (after checking the failure is clean)."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = message_lines(result.stderr)
    if lines and lines[0].startswith(FLAGS_ERROR_PREFIX):  # absl's own flag check
        assert lines[1:] == [ABSL_HINT], result.stderr
        return lines[0]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1 and lines == errors, result.stderr[-3000:]
    return errors[0]


def summaries(directory: Path) -> dict[Path, dict[str, dict[int, object]]]:
    """{event file: {tag: {step: scalar value, or the plugin name for a non-scalar}}}."""
    out = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        tags: dict[str, dict[int, object]] = {}
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                if plugin == "scalars":
                    content = float(tf.make_ndarray(value.tensor))
                else:
                    content = plugin or value.WhichOneof("value")
                tags.setdefault(value.tag, {})[event.step] = content
        out[path] = tags
    return out


def saved_steps(train_dir: Path) -> list[int]:
    """The steps of the model.ckpt-STEP checkpoints (their .index files) in train_dir."""
    return sorted(int(p.name[len("model.ckpt-"):-len(".index")])
                  for p in train_dir.glob("model.ckpt-*.index"))


def listed_checkpoints(train_dir: Path, swept: int = 0) -> list[str]:
    """The checkpoints the `checkpoint` state file lists, each checked to be readable.

    Up to `swept` of the oldest may be gone or partly gone (not returned): a process killed
    inside tf.train.CheckpointManager.save, which lists the new checkpoint before it deletes
    the oldest so that a kill there loses nothing new.
    """
    state = tf.train.get_checkpoint_state(str(train_dir))
    assert state is not None, list(train_dir.iterdir())
    paths = list(state.all_model_checkpoint_paths)
    assert paths[-1] == state.model_checkpoint_path
    complete = checkpoints.complete_checkpoints(str(train_dir))
    gone = [path for path in paths if path not in complete]
    assert gone == paths[:len(gone)] and len(gone) <= swept, (gone, swept)
    paths = paths[len(gone):]
    for path in paths:
        step = int(path.rsplit("-", 1)[1])
        assert tf.train.load_checkpoint(path).get_tensor(ITERATIONS) == step, path
    return paths


def scaled(pixels: np.ndarray) -> np.ndarray:
    """uint8 [n, h, w] -> float32 [n, h, w, 1] as the readers scale them."""
    return pixels[..., None].astype(np.float32) * np.float32(1.0 / 255)


def wrong_count(checkpoint: str, images: np.ndarray, labels: np.ndarray) -> int:
    """Wrong argmax predictions of the checkpoint's model, computed here."""
    logits = checkpoints.load_model(checkpoint)(images, training=False).numpy()
    return int(np.sum(np.argmax(logits, axis=1) != labels))


def report(stdout: str) -> dict[str, int | float]:
    """The figures of evaluation.TestResult.report's lines in stdout."""
    wrong = re.search(r"^Total wrong predictions: (\d+), wrong percent: ([\d.e+-]+)%$", stdout,
                      re.M)
    accuracy = re.search(r"^Accuracy: ([\d.]+)% \((\d+) of (\d+) correct\)$", stdout, re.M)
    assert wrong and accuracy, stdout[-2000:]
    out = {"wrong": int(wrong.group(1)), "wrong_percent": float(wrong.group(2)),
           "accuracy": float(accuracy.group(1)), "correct": int(accuracy.group(2)),
           "total": int(accuracy.group(3))}
    almost = re.search(r"^Almost wrong predictions \(neither digit found\): (\d+), at least "
                       r"one found: (\d+) of (\d+)$", stdout, re.M)
    if almost:
        out.update(almost=int(almost.group(1)), one_found=int(almost.group(2)))
    return out


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Tiny MNIST records: 8 training and 8 test digits, and 16 MultiMNIST pairs in 2 shards."""
    data_dir = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    pixels = np.zeros((NUM_IMAGES, 28, 28), np.uint8)
    pixels[:, 4:-4, 4:-4] = rng.integers(0, 256, (NUM_IMAGES, 20, 20))
    labels = np.arange(NUM_IMAGES) % 10
    test_pixels, test_labels = pixels[::-1].copy(), (labels[::-1] + 3) % 10
    mnist_shift.write_single(pixels, labels, str(data_dir / record_name("train", 2)), 0, 0)
    mnist_shift.write_single(test_pixels, test_labels, str(data_dir / record_name("test", 0)),
                             0, 0)
    prefix = data_dir / record_name("test", 4, multi_targets=True)
    shards = mnist_shift.write_multi(pixels, labels, str(prefix), shift=4, pad=4, num_pairs=2,
                                     max_shard=NUM_IMAGES, seed=0)
    assert len(shards) == 2
    return {"dir": data_dir, "test_images": scaled(test_pixels), "test_labels": test_labels,
            "multi": f"{prefix}@2"}


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory) -> dict:
    """3 steps with --save_step=2; what summary_dir/train holds right after."""
    summary_dir = tmp_path_factory.mktemp("run")
    train_dir = summary_dir / "train"
    args = [f"--data_dir={data['dir']}", f"--summary_dir={summary_dir}", "--save_step=2",
            "--batch_size=4", f"--hparams_override={DECAYING}"]
    step, stdout = run(*args, "--max_steps=3")
    return {"args": args, "step": step, "stdout": stdout, "train_dir": train_dir,
            "files": sorted(p.name for p in train_dir.iterdir()),
            "steps": saved_steps(train_dir), "checkpoints": listed_checkpoints(train_dir),
            "summaries": summaries(train_dir)}


@pytest.fixture(scope="module")
def resumed_run(first_run) -> dict:
    """The same command with --max_steps=5."""
    train_dir = first_run["train_dir"]
    before = set(train_dir.glob("events.out.tfevents.*"))
    run(*first_run["args"], "--max_steps=5")
    new_events = {path: tags for path, tags in summaries(train_dir).items()
                  if path not in before}
    return {"steps": saved_steps(train_dir), "checkpoints": listed_checkpoints(train_dir),
            "summaries": new_events}


# ---- the config -------------------------------------------------------------------------

def test_parse_config_reads_every_flag_into_a_frozen_config():
    config = experiment.parse_config(["--data_dir=d", "--max_steps=7", "--train=false",
                                      "--hparams_override=routing=2", "--distort"])
    assert (config.data_dir, config.max_steps, config.train, config.distort) == (
        "d", 7, False, True)
    assert config.hparams_override == "routing=2" and config.batch_size == 128  # default
    with pytest.raises(AttributeError):
        config.max_steps = 8  # frozen
    values = flags.FlagValues()
    experiment.define_flags(values)
    assert sorted(values) == sorted(field.name for field in experiment.dataclasses.fields(
        experiment.Config))  # one field per flag
    with pytest.raises(flags.IllegalFlagValueError, match="num_targets"):
        experiment.parse_config(["--num_targets=3"])


# ---- training ---------------------------------------------------------------------------

def test_training_saves_checkpoints_every_save_step_and_at_the_last(first_run):
    train_dir = first_run["train_dir"]
    assert first_run["step"] == 3
    assert first_run["steps"] == [2, 3]
    assert first_run["checkpoints"] == [str(train_dir / "model.ckpt-2"),
                                        str(train_dir / "model.ckpt-3")]
    assert {"checkpoint", checkpoints.RUN_FILE} <= set(first_run["files"])
    assert not [name for name in first_run["files"] if "tmp" in name or "temp" in name]
    assert "total_params:" in first_run["stdout"]


def test_training_writes_the_run_file_that_rebuilds_the_model(first_run):
    content = json.loads((first_run["train_dir"] / checkpoints.RUN_FILE).read_text())
    assert content["model"] == "capsule"
    assert {key: content["config"][key] for key in ("input_shape", "num_classes",
                                                    "num_targets")} == {
        "input_shape": [28, 28, 1], "num_classes": 10, "num_targets": 1}
    hparams = content["hparams"]
    assert (hparams["num_prime_capsules"], hparams["routing"], hparams["decay_steps"],
            hparams["remake"]) == (1, 1, 1, True)
    assert {key: content["flags"][key] for key in ("model", "dataset", "num_targets",
                                                   "batch_size", "hparams_override")} == {
        "model": "capsule", "dataset": "mnist", "num_targets": 1, "batch_size": 4,
        "hparams_override": DECAYING}
    model = checkpoints.load_model(first_run["checkpoints"][-1])  # from the path alone
    assert isinstance(model, CapsNet) and model.hparams.num_prime_capsules == 1


def test_training_writes_scalar_and_image_summaries(first_run):
    (tags,) = first_run["summaries"].values()
    for name in ("loss", "accuracy", "learning_rate", "classification_loss",
                 "reconstruction_loss"):
        assert sorted(tags[name]) == [1, 2, 3], name
        assert all(math.isfinite(value) for value in tags[name].values()), tags[name]
    assert all(0.0 <= value <= 1.0 for value in tags["accuracy"].values())
    assert sorted(tags["reconstruction"]) == [2, 3]  # with each checkpoint
    assert set(tags["reconstruction"].values()) == {"images"}
    rates = tags["learning_rate"]
    assert rates[1] == pytest.approx(1e-3, rel=1e-5) or rates[1] == pytest.approx(5e-4)
    assert [rates[step] / rates[1] for step in (2, 3)] == pytest.approx([0.5, 0.25], rel=1e-5)


@pytest.mark.slow
def test_rerun_resumes_at_the_latest_checkpoint_with_the_optimizer_step(first_run,
                                                                        resumed_run):
    train_dir = first_run["train_dir"]
    assert resumed_run["steps"] == [2, 3, 4, 5]
    assert resumed_run["checkpoints"] == [str(train_dir / f"model.ckpt-{step}")
                                          for step in (2, 3, 4, 5)]
    (tags,) = resumed_run["summaries"].values()  # one new event file: steps 4 and 5 only
    assert sorted(tags["loss"]) == [4, 5] and sorted(tags["accuracy"]) == [4, 5]
    # The learning rate goes on decaying from the restored step, not from 0.
    (first_tags,) = first_run["summaries"].values()
    rates = {**first_tags["learning_rate"], **tags["learning_rate"]}
    assert [rates[step] / rates[1] for step in (4, 5)] == pytest.approx([0.125, 0.0625],
                                                                        rel=1e-5)


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_at_the_last_saved_step(data, tmp_path):
    summary_dir = tmp_path / "run"
    train_dir = summary_dir / "train"
    args = [f"--data_dir={data['dir']}", f"--summary_dir={summary_dir}", "--save_step=1",
            "--batch_size=4", f"--hparams_override={SMALL},remake=false"]
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen([sys.executable, "experiment.py", *args, "--max_steps=100000"],
                                   cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and process.poll() is None:
                state = tf.train.get_checkpoint_state(str(train_dir))
                if state is not None and len(state.all_model_checkpoint_paths) >= 2:
                    break
                time.sleep(0.1)
            assert process.poll() is None, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.3)  # somewhere in a later step or save
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = listed_checkpoints(train_dir, swept=1)  # all readable but an oldest being deleted
    assert len(killed) >= 2
    # The newest complete checkpoint on disk: the state file's latest, or the one after it
    # when the kill came between writing its files and listing it.
    last = checkpoints.checkpoint_step(checkpoints.complete_checkpoints(str(train_dir))[-1])
    assert last - checkpoints.checkpoint_step(killed[-1]) in (0, 1)
    before = set(train_dir.glob("events.out.tfevents.*"))

    experiment_cli(*args, f"--max_steps={last + 2}", check=True)

    resumed = listed_checkpoints(train_dir)
    assert resumed[-3:] == [str(train_dir / f"model.ckpt-{step}")
                            for step in (last, last + 1, last + 2)]
    new = {path: tags for path, tags in summaries(train_dir).items() if path not in before}
    (tags,) = new.values()
    assert sorted(tags["loss"]) == [last + 1, last + 2]


@pytest.mark.slow
def test_nan_loss_stops_with_the_last_good_checkpoint_kept(data, tmp_path):
    train_dir = tmp_path / "train"
    with pytest.raises(NonFiniteLossError) as error:
        run(f"--data_dir={data['dir']}", f"--summary_dir={tmp_path}", "--save_step=1",
            "--max_steps=6", "--batch_size=4",
            f"--hparams_override={SMALL},remake=false,learning_rate=1e30")
    message = str(error.value)
    found = re.fullmatch(r"loss is (nan|inf|-inf) at step (\d+); training stopped, the last "
                         r"good checkpoint is (\S+)", message)
    assert found, message
    bad_step, last_good = int(found.group(2)), found.group(3)
    assert bad_step >= 2, message  # lr 1e30: step 1 from the initial weights is finite
    assert last_good == str(train_dir / f"model.ckpt-{bad_step - 1}")
    assert listed_checkpoints(train_dir)[-1] == last_good  # readable, at its step
    assert saved_steps(train_dir) == list(range(1, bad_step))
    (tags,) = summaries(train_dir).values()
    assert sorted(tags["loss"]) == list(range(1, bad_step))
    assert all(math.isfinite(value) for value in tags["loss"].values())


# ---- evaluation ---------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluation_of_a_checkpoint_prints_the_reference_line(data, first_run):
    checkpoint = first_run["checkpoints"][-1]
    result, stdout = run(f"--data_dir={data['dir']}", "--train=false",
                         f"--checkpoint={checkpoint}", "--eval_size=5")
    expected = wrong_count(checkpoint, data["test_images"][:5], data["test_labels"][:5])
    assert isinstance(result, evaluation.TestResult) and result.wrong == expected
    figures = report(stdout)
    assert figures["wrong"] == expected
    assert f"wrong percent: {100 * expected / 5:g}%" in stdout
    assert (figures["total"], figures["correct"]) == (5, 5 - expected)
    assert figures["accuracy"] == pytest.approx(100 * (5 - expected) / 5)
    assert "almost" not in figures


@pytest.mark.slow
def test_mixed_bfloat16_trains_float32_weights_and_evaluates(data, tmp_path, monkeypatch):
    run(f"--data_dir={data['dir']}", f"--summary_dir={tmp_path}", "--max_steps=2",
        "--batch_size=4", f"--hparams_override={SMALL}", "--mixed_bfloat16")
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    train_dir = tmp_path / "train"
    content = json.loads((train_dir / checkpoints.RUN_FILE).read_text())
    assert content["flags"]["mixed_bfloat16"] is True
    checkpoint = str(train_dir / "model.ckpt-2")
    reader = tf.train.load_checkpoint(checkpoint)
    dtypes = {name: dtype for name, dtype in reader.get_variable_to_dtype_map().items()
              if name.endswith("VARIABLE_VALUE")}
    assert dtypes and set(dtypes.values()) <= {tf.float32, tf.int64}, dtypes
    # Evaluation runs in the precision its own --mixed_bfloat16 asks for, not the training's.
    built, load_model = [], checkpoints.load_model

    def recording_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        built.append(model.dtype_policy.name)
        return model

    monkeypatch.setattr(checkpoints, "load_model", recording_load_model)
    for flag, policy in (("--mixed_bfloat16", "mixed_bfloat16"),
                         ("--nomixed_bfloat16", "float32")):
        result, _ = run(f"--data_dir={data['dir']}", "--train=false", flag,
                        f"--checkpoint={checkpoint}", "--eval_size=5")
        assert result.total == 5 and built[-1] == policy


@pytest.mark.slow
def test_multimnist_training_and_evaluation_print_the_almost_line(data, tmp_path):
    args = [f"--data_dir={data['multi']}", "--num_targets=2"]
    run(*args, f"--summary_dir={tmp_path}", "--max_steps=1", "--batch_size=4",
        f"--hparams_override={SMALL}")
    checkpoint = str(tmp_path / "train" / "model.ckpt-1")
    _, stdout = run(*args, "--train=false", f"--checkpoint={checkpoint}", "--eval_size=10")
    figures = report(stdout)
    assert figures["total"] == 10 and "almost" in figures, stdout

    batch = next(iter(input_data.inputs("mnist", "test", data["multi"], 100, num_targets=2)))
    images, labels = batch["images"].numpy()[:10], batch["labels"].numpy()[:10]
    model = checkpoints.load_model(checkpoint)
    assert model.num_targets == 2 and model.image_shape == (36, 36, 1)
    top2 = np.argsort(-model(images, training=False).numpy(), axis=1)[:, :2]
    found = np.take_along_axis(labels, top2, axis=1).sum(axis=1)  # labelled classes in top 2
    assert figures["wrong"] == int(np.sum(found < 2))
    assert figures["almost"] == int(np.sum(found == 0))
    assert figures["one_found"] == 10 - figures["almost"]


@pytest.mark.slow
def test_multimnist_made_on_the_fly_from_the_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    for (images_name, labels_name), count in ((idx.TRAIN_FILES, 12), (idx.TEST_FILES, 6)):
        pixels = np.zeros((count, 28, 28), np.uint8)
        pixels[:, 4:-4, 4:-4] = rng.integers(0, 256, (count, 20, 20))
        (tmp_path / images_name).write_bytes(idx.encode_images(pixels))
        (tmp_path / labels_name).write_bytes(idx.encode_labels(np.arange(count) % 10))
    args = [f"--data_dir={tmp_path}", "--dataset=multimnist", "--num_targets=2"]
    run(*args, f"--summary_dir={tmp_path / 'run'}", "--max_steps=1", "--batch_size=4",
        f"--hparams_override={SMALL}")
    checkpoint = str(tmp_path / "run" / "train" / "model.ckpt-1")
    _, stdout = run(*args, "--train=false", f"--checkpoint={checkpoint}", "--num_pairs=2",
                    "--eval_size=12")
    figures = report(stdout)
    assert figures["total"] == 12 and "almost" in figures, stdout


@pytest.mark.slow
def test_evaluation_watches_summary_dir_and_writes_test_summaries(data, first_run,
                                                                  resumed_run):
    summary_dir = first_run["train_dir"].parent
    latest = resumed_run["checkpoints"][-1]
    assert latest.endswith("model.ckpt-5")
    _, stdout = run(f"--data_dir={data['dir']}", "--train=false",
                    f"--summary_dir={summary_dir}", "--eval_interval_secs=1",
                    "--eval_timeout_secs=2", "--eval_size=5")  # and returns
    assert stdout.count(f"{latest}:\n") == 1, stdout
    figures = report(stdout)
    assert figures["wrong"] == wrong_count(latest, data["test_images"][:5],
                                           data["test_labels"][:5])
    (tags,) = summaries(summary_dir / "test").values()
    assert tags["wrong_prediction"] == {5: figures["wrong"]}
    assert tags["correct_prediction"] == {5: 5 - figures["wrong"]}
    assert tags["accuracy"][5] == pytest.approx(1 - figures["wrong"] / 5)
    assert set(tags["almost_wrong_prediction"]) == {5}


@pytest.mark.slow
def test_ensemble_takes_each_trials_model_from_its_run_file(data, tmp_path):
    # Trials of 1 primary capsule type: only their run files make them restorable, since
    # the flags of the evaluation give no --hparams_override.
    for trial in range(2):
        run(f"--data_dir={data['dir']}", f"--summary_dir={tmp_path / f'trial{trial}'}",
            "--max_steps=1", "--batch_size=4", f"--hparams_override={SMALL}",
            f"--seed={trial}")
    pattern = str(tmp_path / "trial{}" / "train" / "model.ckpt-1")
    result, stdout = run(f"--data_dir={data['dir']}", "--train=false", "--num_trials=2",
                         f"--checkpoint={pattern}", "--eval_size=8")
    logits = sum(checkpoints.load_model(pattern.format(trial))(data["test_images"]).numpy()
                 for trial in range(2))
    expected = int(np.sum(np.argmax(logits, axis=1) != data["test_labels"]))
    assert result.wrong == expected == report(stdout)["wrong"]
    assert result.total == 8


@pytest.mark.slow
def test_export_of_a_distort_run_gives_the_same_logits(data, tmp_path):
    run(f"--data_dir={data['dir']}", f"--summary_dir={tmp_path}", "--max_steps=2",
        "--batch_size=4", f"--hparams_override={SMALL}", "--distort")
    checkpoint = str(tmp_path / "train" / "model.ckpt-2")
    prefix = export_weights(checkpoint, str(tmp_path / "shipped"))
    assert prefix == str(tmp_path / "shipped" / "model.ckpt-2")
    assert not any("optimizer" in name for name, _ in tf.train.list_variables(prefix))
    exported, trained = checkpoints.load_model(prefix), checkpoints.load_model(checkpoint)
    assert exported.image_shape == (24, 24, 1)
    images = data["test_images"][:, 2:26, 2:26]  # the central crops
    np.testing.assert_array_equal(exported(images).numpy(), trained(images).numpy())
    assert checkpoints.read_run_file(prefix).flags["distort"] is True
    # Evaluated without --distort, the 28x28 test images do not fit: one line says why.
    with pytest.raises(UsageError, match=r"takes 24x24x1 images .* --distort=false gives "
                                         r"28x28x1"):
        run(f"--data_dir={data['dir']}", "--train=false", f"--checkpoint={prefix}")
    result, _ = run(f"--data_dir={data['dir']}", "--train=false", f"--checkpoint={prefix}",
                    "--distort", "--eval_size=8")
    expected = np.sum(np.argmax(trained(images).numpy(), axis=1) != data["test_labels"])
    assert result.wrong == expected


# ---- bad input ----------------------------------------------------------------------------

def _bad_input_cases():
    """(id, args(context), strings the error names); context: data, checkpoint, tmp."""
    def trained(*args):
        return lambda c: [f"--data_dir={c['data']}", f"--summary_dir={c['tmp'] / 'run'}", *args]

    def evaluated(*args):
        return lambda c: [f"--data_dir={c['data']}", "--train=false",
                          f"--checkpoint={c['checkpoint']}", *args]

    missing = "missing"  # an empty data directory
    return [
        ("hparams_malformed", trained("--hparams_override=routing"),
         ["--hparams_override", "'routing'", "key=value"]),
        ("hparams_unknown_key", trained("--hparams_override=routing=2,routingz=3"),
         ["--hparams_override", "'routingz'", "allowed: ", "num_prime_capsules", "routing"]),
        ("hparams_bad_value", evaluated("--hparams_override=routing=three"),
         ["--hparams_override", "routing='three'", "expected int"]),
        ("missing_train_data",
         lambda c: [f"--data_dir={c['tmp'] / missing}", f"--summary_dir={c['tmp'] / 'run'}"],
         ["{tmp}/missing/train_2shifted_mnist.tfrecords not found",
          "python input_data/mnist/mnist_shift.py --data_dir={tmp}/missing --split=train "
          "--shift=2"]),
        ("missing_test_data",
         lambda c: [f"--data_dir={c['tmp'] / missing}", "--train=false",
                    f"--checkpoint={c['checkpoint']}"],
         ["{tmp}/missing/test_0shifted_mnist.tfrecords not found",
          "python input_data/mnist/mnist_shift.py --data_dir={tmp}/missing --split=test "
          "--shift=0"]),
        ("missing_multimnist_shards",
         lambda c: [f"--data_dir={c['tmp'] / missing / 'multi'}@3", "--num_targets=2",
                    f"--summary_dir={c['tmp'] / 'run'}"],
         ["{tmp}/missing/multi-00000-of-00003 not found",
          "python input_data/mnist/mnist_shift.py", "--multi_targets"]),
        ("missing_checkpoint",
         lambda c: [f"--data_dir={c['data']}", "--train=false",
                    f"--checkpoint={c['tmp'] / 'nowhere' / 'model.ckpt-7'}"],
         ["checkpoint {tmp}/nowhere/model.ckpt-7 not found"]),
        ("num_gpus", trained("--num_gpus=2"), ["--num_gpus=2", "this machine has 0 GPU"]),
        ("num_trials_without_pattern", evaluated("--num_trials=2"),
         ["--num_trials", "--checkpoint", "{}"]),
        ("random_shift_cifar10", trained("--dataset=cifar10", "--random_shift=2"),
         ["random_shift=2", "single-digit mnist"]),
        ("checkpoint_of_other_data", evaluated("--num_targets=2"),
         ["takes 28x28x1 images", "--num_targets=2", "36x36x1"]),
        ("multimnist_one_target", trained("--dataset=multimnist"),
         ["multimnist", "num_targets=1", "expected num_targets=2"]),
        ("num_pairs_for_mnist", evaluated("--num_pairs=2"), ["num_pairs=2", "only for multimnist"]),
    ]


BAD_INPUT_CASES = _bad_input_cases()


@pytest.mark.parametrize("make_args, expected", [case[1:] for case in BAD_INPUT_CASES],
                         ids=[case[0] for case in BAD_INPUT_CASES])
def test_bad_input_is_a_usage_error_naming_the_flag(data, first_run, tmp_path, make_args,
                                                   expected):
    if "--num_gpus=2" in expected and tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has GPUs")
    (tmp_path / "missing").mkdir()
    context = {"data": data["dir"], "checkpoint": first_run["checkpoints"][-1],
               "tmp": tmp_path}
    with pytest.raises(UsageError) as error:
        run(*make_args(context))
    message = str(error.value)
    assert "\n" not in message, message
    for text in expected:
        assert text.replace("{tmp}", str(tmp_path)) in message, message
    assert not (tmp_path / "run").exists()  # nothing written


# ---- the command line ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["--dataset=imagenet"], ["--dataset=imagenet", "mnist|norb|cifar10"]),
    (["--num_targets=3"], ["--num_targets=3", "[1, 2]"]),
    (["--data_dir={tmp}", "--train=false", "--checkpoint={tmp}/model.ckpt-7"],
     ["checkpoint {tmp}/model.ckpt-7 not found"]),
    (["--summary_dir={tmp}/run", "--hparams_override=routingz=3"],
     ["--hparams_override", "'routingz'"]),
], ids=["enum_flag", "bounded_flag", "missing_checkpoint", "hparams_override"])
def test_command_line_error_is_one_line_with_exit_code_1(tmp_path, args, expected):
    result = experiment_cli(*(arg.replace("{tmp}", str(tmp_path)) for arg in args))
    line = error_line(result)
    assert result.returncode == 1
    for text in expected:
        assert text.replace("{tmp}", str(tmp_path)) in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_command_line_names_a_damaged_record_file_in_one_line(first_run, tmp_path):
    # (tests/test_experiment_faults.py: every kind of damage, in-process.)
    path = tmp_path / record_name("test", 0)
    path.write_bytes(b"not a record file")
    result = experiment_cli(f"--data_dir={tmp_path}", "--train=false",
                            f"--checkpoint={first_run['checkpoints'][-1]}")
    assert result.returncode == 1
    assert error_line(result).startswith(f"{ERROR_PREFIX}{path}: "), result.stderr[-3000:]


@pytest.mark.slow
def test_command_line_trains_and_evaluates(data, tmp_path):
    experiment_cli(f"--data_dir={data['dir']}", f"--summary_dir={tmp_path}", "--max_steps=1",
                   "--batch_size=4", f"--hparams_override={SMALL}", check=True)
    checkpoint = tmp_path / "train" / "model.ckpt-1"
    result = experiment_cli(f"--data_dir={data['dir']}", "--train=false",
                            f"--checkpoint={checkpoint}", "--eval_size=5", check=True)
    assert report(result.stdout)["wrong"] == wrong_count(
        str(checkpoint), data["test_images"][:5], data["test_labels"][:5])


def main_raising(monkeypatch, error: BaseException) -> None:
    """Runs experiment.main with flags parsed from '--data_dir=unused', its run raising
    `error`."""
    def failing_run(config):
        raise error

    monkeypatch.setattr(experiment, "run", failing_run)
    values = flags.FlagValues()
    experiment.define_flags(values)
    values(["experiment.py", "--data_dir=unused"])
    monkeypatch.setattr(experiment, "FLAGS", values)
    experiment.main(["experiment.py"])


@pytest.mark.parametrize("bug", [
    tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [4,10] vs. [4,5]"),
    KeyError("images"),
])
def test_main_keeps_the_traceback_of_what_is_no_user_error(monkeypatch, bug):
    # Only the project's errors and file-system errors become one line; a bug propagates.
    with pytest.raises(type(bug)):
        main_raising(monkeypatch, bug)


def test_main_prints_an_unwritable_folder_in_one_line(monkeypatch, capsys):
    unwritable = tf.errors.PermissionDeniedError(None, None, "runs/x/train; Permission denied")
    with pytest.raises(SystemExit) as stop:
        main_raising(monkeypatch, unwritable)
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "experiment.py: error: runs/x/train; Permission denied"]
