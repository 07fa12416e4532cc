"""experiment.py on the command line, in subprocesses, on tiny records: training with
checkpoints, summaries and resumption (also after kill -9), a NaN loss, evaluation of one
checkpoint (single digits and MultiMNIST) and of each new one, and every bad input.

The models are small (--hparams_override=num_prime_capsules=1,routing=1) and the batches
4 images, so that each run takes a few seconds; the runs are shared between tests by
module-scoped fixtures. (The ensemble is in test_tf1_checkpoint.py.)
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import input_data
from capsules import checkpoints
from capsules.models import CapsNet
from input_data.mnist import mnist_shift

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

def experiment(*args: str, check: bool = False) -> subprocess.CompletedProcess:
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


def listed_checkpoints(train_dir: Path) -> list[str]:
    """The checkpoints the `checkpoint` state file lists, each checked to be readable."""
    state = tf.train.get_checkpoint_state(str(train_dir))
    assert state is not None, list(train_dir.iterdir())
    paths = list(state.all_model_checkpoint_paths)
    assert paths[-1] == state.model_checkpoint_path
    for path in paths:
        step = int(path.rsplit("-", 1)[1])
        assert tf.train.load_checkpoint(path).get_tensor(ITERATIONS) == step, path
    return paths


def scaled(pixels: np.ndarray) -> np.ndarray:
    """uint8 [n, h, w] -> float32 [n, h, w, 1] as the readers scale them."""
    return pixels[..., None].astype(np.float32) * np.float32(1.0 / 255)


def restored_capsnet(checkpoint: str, input_shape, num_targets: int = 1) -> CapsNet:
    """A CapsNet with the hparams saved next to `checkpoint` and its weights."""
    model = CapsNet(checkpoints.checkpoint_hparams(checkpoint), input_shape=input_shape,
                    num_targets=num_targets)
    model(np.zeros((1, *input_shape), np.float32))  # build, so that restoring is checked
    checkpoints.restore_weights(model, checkpoint)
    return model


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
    mnist_shift.write_single(pixels, labels,
                             str(data_dir / mnist_shift.record_name("train", 2)), 0, 0)
    mnist_shift.write_single(test_pixels, test_labels,
                             str(data_dir / mnist_shift.record_name("test", 0)), 0, 0)
    prefix = data_dir / mnist_shift.record_name("test", 4, multi_targets=True)
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
    result = experiment(*args, "--max_steps=3", check=True)
    return {"args": args, "result": result, "train_dir": train_dir,
            "files": sorted(p.name for p in train_dir.iterdir()),
            "steps": saved_steps(train_dir), "checkpoints": listed_checkpoints(train_dir),
            "summaries": summaries(train_dir)}


@pytest.fixture(scope="module")
def resumed_run(first_run) -> dict:
    """The same command with --max_steps=5."""
    train_dir = first_run["train_dir"]
    before = set(train_dir.glob("events.out.tfevents.*"))
    result = experiment(*first_run["args"], "--max_steps=5", check=True)
    new_events = {path: tags for path, tags in summaries(train_dir).items()
                  if path not in before}
    return {"result": result, "steps": saved_steps(train_dir),
            "checkpoints": listed_checkpoints(train_dir), "summaries": new_events}


# ---- training ---------------------------------------------------------------------------

def test_training_saves_checkpoints_every_save_step_and_at_the_last(first_run):
    train_dir = first_run["train_dir"]
    assert first_run["steps"] == [2, 3]
    assert first_run["checkpoints"] == [str(train_dir / "model.ckpt-2"),
                                        str(train_dir / "model.ckpt-3")]
    assert {"checkpoint", "hparams.json"} <= set(first_run["files"])
    assert not [name for name in first_run["files"] if "tmp" in name or "temp" in name]
    config = json.loads((train_dir / "hparams.json").read_text())
    assert config["hparams"]["num_prime_capsules"] == 1
    assert config["hparams"]["routing"] == 1
    assert config["hparams"]["decay_steps"] == 1 and config["hparams"]["remake"] is True
    assert {key: config[key] for key in ("model", "dataset", "num_targets", "batch_size")} == {
        "model": "capsule", "dataset": "mnist", "num_targets": 1, "batch_size": 4}
    assert "total_params:" in first_run["result"].stdout


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
    killed = listed_checkpoints(train_dir)  # all readable
    last = int(killed[-1].rsplit("-", 1)[1])
    assert len(killed) >= 2 and last >= 2
    before = set(train_dir.glob("events.out.tfevents.*"))

    experiment(*args, f"--max_steps={last + 2}", check=True)

    resumed = listed_checkpoints(train_dir)
    assert resumed[-3:] == [str(train_dir / f"model.ckpt-{step}")
                            for step in (last, last + 1, last + 2)]
    new = {path: tags for path, tags in summaries(train_dir).items() if path not in before}
    (tags,) = new.values()
    assert sorted(tags["loss"]) == [last + 1, last + 2]


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(data, tmp_path):
    train_dir = tmp_path / "train"
    result = experiment(f"--data_dir={data['dir']}", f"--summary_dir={tmp_path}",
                        "--save_step=1", "--max_steps=6", "--batch_size=4",
                        f"--hparams_override={SMALL},remake=false,learning_rate=1e30")
    message = error_line(result)
    found = re.fullmatch(ERROR_PREFIX + r"loss is (nan|inf|-inf) at step (\d+); training "
                         r"stopped, the last good checkpoint is (\S+)", message)
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

def wrong_count(checkpoint: str, images: np.ndarray, labels: np.ndarray) -> int:
    """Wrong argmax predictions of the checkpoint's CapsNet, computed here."""
    model = restored_capsnet(checkpoint, images.shape[1:])
    logits = model(images, training=False).numpy()
    return int(np.sum(np.argmax(logits, axis=1) != labels))


def test_evaluation_of_a_checkpoint_prints_the_reference_line(data, first_run):
    checkpoint = str(first_run["train_dir"] / "model.ckpt-3")
    result = experiment(f"--data_dir={data['dir']}", "--train=false",
                        f"--checkpoint={checkpoint}", "--eval_size=5", check=True)
    expected = wrong_count(checkpoint, data["test_images"][:5], data["test_labels"][:5])
    figures = report(result.stdout)
    assert figures["wrong"] == expected
    assert f"wrong percent: {100 * expected / 5:g}%" in result.stdout
    assert (figures["total"], figures["correct"]) == (5, 5 - expected)
    assert figures["accuracy"] == pytest.approx(100 * (5 - expected) / 5)
    assert "almost" not in figures


def test_mixed_bfloat16_trains_float32_weights_and_evaluates(data, tmp_path):
    experiment(f"--data_dir={data['dir']}", f"--summary_dir={tmp_path}", "--max_steps=2",
               "--batch_size=4", f"--hparams_override={SMALL}", "--mixed_bfloat16", check=True)
    train_dir = tmp_path / "train"
    assert json.loads((train_dir / "hparams.json").read_text())["mixed_bfloat16"] is True
    checkpoint = str(train_dir / "model.ckpt-2")
    reader = tf.train.load_checkpoint(checkpoint)
    dtypes = {name: dtype for name, dtype in reader.get_variable_to_dtype_map().items()
              if name.endswith("VARIABLE_VALUE")}
    assert dtypes and set(dtypes.values()) <= {tf.float32, tf.int64}, dtypes
    restored_capsnet(checkpoint, (28, 28, 1))  # a float32 model takes the weights
    result = experiment(f"--data_dir={data['dir']}", "--train=false", "--mixed_bfloat16",
                        f"--checkpoint={checkpoint}", "--eval_size=5", check=True)
    assert report(result.stdout)["total"] == 5


def test_multimnist_training_and_evaluation_print_the_almost_line(data, tmp_path):
    args = [f"--data_dir={data['multi']}", "--num_targets=2"]
    experiment(*args, f"--summary_dir={tmp_path}", "--max_steps=1", "--batch_size=4",
               f"--hparams_override={SMALL}", check=True)
    checkpoint = str(tmp_path / "train" / "model.ckpt-1")
    result = experiment(*args, "--train=false", f"--checkpoint={checkpoint}", "--eval_size=10",
                        check=True)
    figures = report(result.stdout)
    assert figures["total"] == 10 and "almost" in figures, result.stdout

    batch = next(iter(input_data.inputs("mnist", "test", data["multi"], 100, num_targets=2)))
    images, labels = batch["images"].numpy()[:10], batch["labels"].numpy()[:10]
    model = restored_capsnet(checkpoint, images.shape[1:], num_targets=2)
    top2 = np.argsort(-model(images, training=False).numpy(), axis=1)[:, :2]
    found = np.take_along_axis(labels, top2, axis=1).sum(axis=1)  # labelled classes in top 2
    assert figures["wrong"] == int(np.sum(found < 2))
    assert figures["almost"] == int(np.sum(found == 0))
    assert figures["one_found"] == 10 - figures["almost"]


def test_evaluation_watches_summary_dir_and_writes_test_summaries(data, first_run,
                                                                  resumed_run):
    summary_dir = first_run["train_dir"].parent
    latest = resumed_run["checkpoints"][-1]
    assert latest.endswith("model.ckpt-5")
    result = experiment(f"--data_dir={data['dir']}", "--train=false",
                        f"--summary_dir={summary_dir}", "--eval_interval_secs=1",
                        "--eval_timeout_secs=2", "--eval_size=5", check=True)  # and exits
    assert result.stdout.count(f"{latest}:\n") == 1, result.stdout
    figures = report(result.stdout)
    assert figures["wrong"] == wrong_count(latest, data["test_images"][:5],
                                           data["test_labels"][:5])
    (tags,) = summaries(summary_dir / "test").values()
    assert tags["wrong_prediction"] == {5: figures["wrong"]}
    assert tags["correct_prediction"] == {5: 5 - figures["wrong"]}
    assert tags["accuracy"][5] == pytest.approx(1 - figures["wrong"] / 5)
    assert set(tags["almost_wrong_prediction"]) == {5}


# ---- bad input ----------------------------------------------------------------------------

def _bad_input_cases():
    """(id, args(context), strings the error line names); context: data, checkpoint, tmp."""
    def trained(*args):
        return lambda c: [f"--data_dir={c['data']}", f"--summary_dir={c['tmp'] / 'run'}", *args]

    def evaluated(*args):
        return lambda c: [f"--data_dir={c['data']}", "--train=false",
                          f"--checkpoint={c['checkpoint']}", *args]

    missing = "missing"  # an empty data directory
    return [
        ("dataset", lambda c: ["--dataset=imagenet"], ["--dataset=imagenet",
                                                       "mnist|norb|cifar10"]),
        ("model", lambda c: ["--model=resnet"], ["--model=resnet", "capsule|baseline"]),
        ("num_targets", lambda c: ["--num_targets=3"], ["--num_targets=3", "[1, 2]"]),
        ("hparams_malformed", trained("--hparams_override=routing"),
         ["--hparams_override", "'routing'", "key=value"]),
        ("hparams_unknown_key", trained("--hparams_override=routing=2,routingz=3"),
         ["--hparams_override", "'routingz'", "allowed: ", "num_prime_capsules", "routing"]),
        ("hparams_bad_value", trained("--hparams_override=routing=three"),
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
    ]


BAD_INPUT_CASES = _bad_input_cases()


@pytest.mark.parametrize("make_args, expected", [case[1:] for case in BAD_INPUT_CASES],
                         ids=[case[0] for case in BAD_INPUT_CASES])
def test_bad_input_is_one_line_naming_the_flag_without_traceback(data, first_run, tmp_path,
                                                                 make_args, expected):
    if "--num_gpus=2" in expected and tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has GPUs")
    (tmp_path / "missing").mkdir()
    context = {"data": data["dir"], "checkpoint": first_run["train_dir"] / "model.ckpt-3",
               "tmp": tmp_path}
    line = error_line(experiment(*make_args(context)))
    for text in expected:
        assert text.replace("{tmp}", str(tmp_path)) in line, line
    assert not (tmp_path / "run").exists()  # nothing written
