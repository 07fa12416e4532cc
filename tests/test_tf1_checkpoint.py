"""The reference's TF1 checkpoints: written here with tf.compat.v1 under the reference's
names, restored into CapsNet / ConvBaseline, compared with a NumPy forward pass of the
reference's equations; the ensemble through experiment.run; load_model; the errors."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import input_data
from capsules import checkpoints, experiment, tf1_checkpoint
from capsules.errors import UsageError
from capsules.hparams import HParams
from capsules.models import CapsNet, ConvBaseline
from input_data.records import bytes_feature, int64_feature
from tests import tf1_reference as ref

MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (24, 24, 3)
CIFAR_HPARAMS = HParams(num_prime_capsules=64, padding="SAME", leaky=True, remake=False)
RTOL = 1e-4


def relative_difference(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def lengths(capsules: np.ndarray) -> np.ndarray:
    return np.linalg.norm(capsules, axis=-1)


@pytest.fixture(scope="module")
def mnist_trials(tmp_path_factory) -> list[tuple[str, dict]]:
    """Two MNIST CapsNet checkpoints (trial0 with global_step and Adam's slots) + weights."""
    root = tmp_path_factory.mktemp("mnist")
    trials = []
    for trial in range(2):
        weights = ref.capsnet_weights(np.random.default_rng(trial), MNIST_SHAPE, 32, "VALID")
        prefix = ref.write_tf1_checkpoint(root / f"trial{trial}", weights, adam=trial == 0)
        trials.append((prefix, weights))
    return trials


@pytest.fixture(scope="module")
def mnist_model() -> CapsNet:
    return CapsNet(input_shape=MNIST_SHAPE)


@pytest.fixture(scope="module")
def cifar_trial(tmp_path_factory) -> tuple[str, dict]:
    weights = ref.capsnet_weights(np.random.default_rng(2), CIFAR_SHAPE, 64, "SAME",
                                  remake=False)
    return ref.write_tf1_checkpoint(tmp_path_factory.mktemp("cifar"), weights), weights


def test_mnist_capsnet_computes_the_reference_logits_and_reconstructions(
        mnist_trials, mnist_model):
    prefix, weights = mnist_trials[0]
    stored = dict(tf.train.list_variables(prefix))
    assert {"global_step", "beta1_power", "conv1/weights/Adam", "capsule2/weights/Adam_1",
            "recons/recons_3/biases"} <= set(stored)
    assert checkpoints.is_tf1_checkpoint(prefix)

    tf1_checkpoint.restore(mnist_model, prefix)

    images = np.random.default_rng(10).random((2, *MNIST_SHAPE), dtype=np.float32)
    capsules = ref.capsnet_forward(weights, images, 32, "VALID", leaky=False)
    assert relative_difference(mnist_model(images), lengths(capsules)) < RTOL
    labels = np.array([3, 7])
    pixels = mnist_model.decoder(
        [mnist_model.class_capsule_outputs(images), tf.one_hot(labels, 10)])
    assert relative_difference(pixels, ref.decoder_forward(weights, capsules, labels)) < RTOL


@pytest.mark.slow
def test_cifar10_capsnet_through_restore_weights(cifar_trial):
    prefix, weights = cifar_trial
    model = CapsNet(CIFAR_HPARAMS, input_shape=CIFAR_SHAPE)
    checkpoints.restore_weights(model, prefix)  # recognises the TF1 checkpoint

    images = np.random.default_rng(11).standard_normal((2, *CIFAR_SHAPE)).astype(np.float32)
    expected = lengths(ref.capsnet_forward(weights, images, 64, "SAME", leaky=True))
    assert relative_difference(model(images), expected) < RTOL


@pytest.mark.slow
def test_baseline_with_uniquified_names(tmp_path):
    weights = ref.baseline_weights(np.random.default_rng(3), MNIST_SHAPE, "VALID")
    # Made outside a tower's name scope, TF1 uniquifies the names: conv1/weights_1.
    prefix = ref.write_tf1_checkpoint(tmp_path, weights, adam=True, tower=False)
    stored = dict(tf.train.list_variables(prefix))
    assert {"conv1/weights_1", "fc1/biases_1", "fc1/weights_1/Adam"} <= set(stored)
    model = ConvBaseline(input_shape=MNIST_SHAPE)
    tf1_checkpoint.restore(model, prefix)

    images = np.random.default_rng(12).random((2, *MNIST_SHAPE), dtype=np.float32)
    expected = ref.baseline_forward(weights, images, "VALID")
    assert relative_difference(model(images), expected) < RTOL


@pytest.mark.slow
def test_ensemble_of_two_tf1_checkpoints_through_experiment(mnist_trials, tmp_path):
    rng = np.random.default_rng(13)
    pixels = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    images = pixels[..., None].astype(np.float32) * np.float32(1.0 / 255)  # as the reader
    per_trial = [lengths(ref.capsnet_forward(weights, images, 32, "VALID", leaky=False))
                 for _, weights in mnist_trials]
    predictions = np.argmax(sum(per_trial), axis=1)
    labels = predictions.copy()
    labels[:2] = (labels[:2] + 1) % 10  # two wrong by construction of the summed logits
    expected_wrong = int(np.sum(predictions != labels))
    # The check tells the ensemble from each single trial.
    for logits in per_trial:
        assert np.sum(np.argmax(logits, axis=1) != labels) != expected_wrong

    data_dir = tmp_path / "mnist_data"
    data_dir.mkdir()
    with tf.io.TFRecordWriter(str(data_dir / "test_0shifted_mnist.tfrecords")) as writer:
        for image, label in zip(pixels, labels, strict=True):
            features = {"height": int64_feature(28), "width": int64_feature(28),
                        "depth": int64_feature(1), "label": int64_feature(label),
                        "image_raw": bytes_feature(image.tobytes())}
            writer.write(tf.train.Example(features=tf.train.Features(feature=features))
                         .SerializeToString())
    trial0 = Path(mnist_trials[0][0])
    pattern = str(trial0.parent.parent / "trial{}" / trial0.name)
    config = experiment.parse_config(["--train=false", "--num_trials=2",
                                      f"--checkpoint={pattern}", f"--data_dir={data_dir}"])
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        result = experiment.run(config)
    assert result.wrong == expected_wrong
    assert f"Total wrong predictions: {expected_wrong}, wrong percent" in stdout.getvalue()


def test_load_model_of_a_tf1_checkpoint_takes_the_model_and_the_data(mnist_trials):
    prefix, weights = mnist_trials[0]
    with pytest.raises(UsageError, match=r"no run file hparams.json .* give the model and the "
                                         r"dataset_info"):
        checkpoints.load_model(prefix)
    with pytest.raises(UsageError, match=r"give the dataset_info \("):
        checkpoints.load_model(prefix, model="capsule")
    model = checkpoints.load_model(prefix, model="capsule",
                                   dataset_info=input_data.dataset_info("mnist"))
    images = np.random.default_rng(14).random((2, *MNIST_SHAPE), dtype=np.float32)
    expected = lengths(ref.capsnet_forward(weights, images, 32, "VALID", leaky=False))
    assert relative_difference(model(images), expected) < RTOL


@pytest.mark.slow
def test_export_command_line_takes_the_model_and_dataset_of_a_tf1_checkpoint(mnist_trials,
                                                                              tmp_path):
    prefix, weights = mnist_trials[0]
    command = [sys.executable, "-m", "capsules.export", f"--checkpoint={prefix}",
               f"--output_dir={tmp_path}"]
    root = Path(__file__).resolve().parents[1]
    missing = subprocess.run(command, capture_output=True, text=True, cwd=root)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("export: error: ")
    subprocess.run([*command, "--model=capsule", "--dataset=mnist"], check=True, cwd=root,
                   capture_output=True)
    exported = checkpoints.load_model(tf.train.latest_checkpoint(str(tmp_path)))
    images = np.random.default_rng(15).random((2, *MNIST_SHAPE), dtype=np.float32)
    expected = lengths(ref.capsnet_forward(weights, images, 32, "VALID", leaky=False))
    assert relative_difference(exported(images), expected) < RTOL


@pytest.mark.slow
def test_cifar10_checkpoint_in_a_default_capsnet_names_the_override(cifar_trial):
    prefix, _ = cifar_trial
    model = CapsNet(input_shape=CIFAR_SHAPE)  # forgot the CIFAR10 hparams
    kernel = model.conv1.kernel.numpy()
    with pytest.raises(ValueError) as error:
        tf1_checkpoint.restore(model, prefix)
    message = str(error.value)
    assert ("conv_capsule1/weights: this model expects shape [9, 9, 256, 256], "
            "the checkpoint has [9, 9, 256, 512]") in message
    assert ("capsule2/weights: this model expects shape [512, 8, 160], "
            "the checkpoint has [9216, 8, 160]") in message
    assert "recons/recons_1/weights: missing from the checkpoint" in message
    assert "--hparams_override=num_prime_capsules=64,padding=SAME,remake=false" in message
    assert "leaky=true" in message
    # Nothing assigned, not even the variables that fit.
    np.testing.assert_array_equal(model.conv1.kernel.numpy(), kernel)


def test_checkpoint_with_a_decoder_in_a_model_without(mnist_trials):
    model = CapsNet(HParams(remake=False), input_shape=MNIST_SHAPE)
    with pytest.raises(ValueError) as error:
        tf1_checkpoint.restore(model, mnist_trials[1][0])
    message = str(error.value)
    assert "recons/recons_2/biases: in the checkpoint, not in this model" in message
    assert "--hparams_override=remake=true" in message


def _small(*shape) -> np.ndarray:
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("weights, adam, expected", [
    ({"conv1/weights": _small(9, 9, 1, 256), "mystery/weights": _small(2),
      "conv1/kernel": _small(3)},
     True, r"does not have: conv1/kernel, mystery/weights$"),
    ({"fc1/weights": _small(4, 2), "softmax_layer/biases": _small(2)},
     False, r"fc1/weights, softmax_layer/biases \(.*--model=baseline\)"),
    ({"conv1/weights": _small(9, 9, 1, 256), "conv1/weights_1": _small(9, 9, 1, 256)},
     False, r"holds both conv1/weights and conv1/weights_1"),
])
def test_unknown_and_ambiguous_variables(tmp_path, mnist_model, weights, adam, expected):
    prefix = ref.write_tf1_checkpoint(tmp_path, weights, adam=adam)
    with pytest.raises(ValueError, match=expected) as error:
        tf1_checkpoint.restore(mnist_model, prefix)
    assert "global_step" not in str(error.value) and "Adam" not in str(error.value)


def test_capsnet_checkpoint_in_the_baseline_and_other_models(mnist_trials):
    prefix = mnist_trials[1][0]
    with pytest.raises(ValueError, match=r"conv_capsule1/weights.*--model=capsule"):
        tf1_checkpoint.restore(ConvBaseline(input_shape=(20, 20, 1)), prefix)
    with pytest.raises(TypeError, match="CapsNet or ConvBaseline"):
        tf1_checkpoint.restore(keras.Sequential([keras.layers.Dense(1)]), prefix)
