"""The CapsNet shipped in checkpoints/mnist: weights only, complete, rebuilt from its path
alone, and it reads digits."""

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import input_data
from capsules import CapsNet, checkpoints, default_hparams, experiment
from input_data.mnist import mnist_shift
from input_data.mnist.record_names import record_name

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist"


@pytest.fixture(scope="module")
def shipped():
    prefix = tf.train.latest_checkpoint(str(SHIPPED))
    assert prefix, f"no checkpoint in {SHIPPED}"
    return prefix, checkpoints.load_model(prefix)


def assert_weights_only(prefix: str, max_megabytes: int) -> None:
    """The checkpoint at `prefix` holds no optimizer state and its files are small."""
    names = [name for name, _ in tf.train.list_variables(prefix)]
    assert not any("optimizer" in name for name in names)
    size = sum(os.path.getsize(path) for path in tf.io.gfile.glob(prefix + "*"))
    assert size < max_megabytes * 2**20


def test_weights_only_and_under_40_mb(shipped):
    prefix, model = shipped
    assert_weights_only(prefix, 40)
    # Every weight of the model, decoder included, is in the checkpoint (none at its init).
    assert not np.allclose(model.decoder.recons_3.bias.numpy(), 0.1)


def test_run_file_rebuilds_the_trained_model(shipped):
    prefix, model = shipped
    run = checkpoints.read_run_file(prefix)
    assert run.model == "capsule" and run.config["input_shape"] == [28, 28, 1]
    # The schedule of checkpoints/mnist/README.md: the paper's loss, a faster decay.
    assert run.hparams == default_hparams().replace(loss_form="paper", decay_steps=1000,
                                                    decay_rate=0.85)
    assert run.flags["random_shift"] == 2
    assert isinstance(model, CapsNet) and model.hparams == run.hparams


@pytest.mark.slow
def test_load_model_gives_the_logits_of_experiments_evaluation(shipped, tmp_path):
    prefix, model = shipped
    rng = np.random.default_rng(0)
    pixels = np.zeros((4, 28, 28), np.uint8)
    for i, (top, left) in enumerate(rng.integers(4, 12, (4, 2))):
        pixels[i, top:top + 14, left + 6:left + 9] = 255  # a bar: a 1 of sorts
    mnist_shift.write_single(pixels, np.arange(4), str(tmp_path / record_name("test", 0)), 0,
                             0)
    config = experiment.parse_config([f"--data_dir={tmp_path}", "--train=false",
                                      f"--checkpoint={prefix}", "--eval_size=4"])
    with contextlib.redirect_stdout(io.StringIO()):
        result = experiment.run(config)
    images = pixels[..., None].astype(np.float32) * np.float32(1 / 255)
    logits = model(images).numpy()
    assert result.wrong == int(np.sum(np.argmax(logits, axis=1) != np.arange(4)))
    # The model experiment.py evaluates, and one built by hand from the shipped hparams.
    batch = next(iter(input_data.inputs("mnist", "test", str(tmp_path), 4)))
    np.testing.assert_array_equal(batch["images"].numpy(), images)
    by_hand = CapsNet(checkpoints.read_run_file(prefix).hparams)
    checkpoints.restore_weights(by_hand, prefix)
    np.testing.assert_array_equal(logits, by_hand(images).numpy())
    np.testing.assert_array_equal(logits, experiment._load_model(config, prefix)(images).numpy())


def test_reads_the_reference_test_records(shipped, official_testdata):
    _, model = shipped
    path = official_testdata / "mnist"
    batch = next(iter(input_data.inputs("mnist", "test", str(path), batch_size=4)))
    # Four shifted copies of MNIST test image 0, a 7.
    predictions = np.argmax(model(batch["images"]).numpy(), axis=1)
    np.testing.assert_array_equal(predictions, [7, 7, 7, 7])
    remake = model.reconstruct(batch["images"], predictions).numpy()
    error = np.mean((remake - batch["images"].numpy()) ** 2)
    assert error < np.mean(batch["images"].numpy() ** 2) / 2
