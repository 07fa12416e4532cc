"""Tests of capsules.visualize on a tiny random CapsNet checkpoint and tiny MNIST records."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from capsules import visualize
from capsules.checkpoints import write_run_file
from capsules.hparams import default_hparams
from capsules.models import CapsNet
from input_data.mnist import mnist_shift
from input_data.mnist.record_names import record_name
from tests.test_input_mnist import write_idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = np.array([7, 2, 1, 0, 4, 1], np.uint8)


def tiny_digits() -> np.ndarray:
    """uint8 [6, 28, 28]: a bright bar in a different place in each image."""
    images = np.zeros((len(LABELS), 28, 28), np.uint8)
    for i in range(len(LABELS)):
        images[i, 6 + 2 * i:12 + 2 * i, 8:20] = 255
    return images


def save_tiny_capsnet(directory, size: int, remake: bool = True) -> str:
    """A random CapsNet on size x size x 1 images saved as directory/model.ckpt-1, with its
    run file (1 primary capsule type: the checkpoint only fits with the saved hparams)."""
    hparams = default_hparams().replace(num_prime_capsules=1, routing=1, remake=remake)
    model = CapsNet(hparams, input_shape=(size, size, 1), num_targets=1 if size == 28 else 2)
    os.makedirs(directory, exist_ok=True)
    write_run_file(directory, model)
    return tf.train.Checkpoint(model=model).save(os.path.join(directory, "model.ckpt"))


def write_events(summary_dir) -> None:
    """Training scalars of 120 steps and test accuracy at 3 steps, as experiment.py writes."""
    for split, tags, steps in (
        ("train", ("loss", "classification_loss", "reconstruction_loss", "accuracy",
                   "learning_rate"), range(1, 121)),
        ("test", ("accuracy", "wrong_prediction", "correct_prediction"), (40, 80, 120)),
    ):
        writer = tf.summary.create_file_writer(os.path.join(summary_dir, split))
        with writer.as_default():
            for step in steps:
                for tag in tags:
                    tf.summary.scalar(tag, 1.0 - 0.5 * step / 120, step=step)
        writer.close()


def pixel_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    data_dir = root / "mnist"
    data_dir.mkdir()
    mnist_shift.write_single(tiny_digits(), LABELS,
                             str(data_dir / record_name("test", 0)), 0, 0)
    prefix = str(data_dir / record_name("test", 4, multi_targets=True))
    names = mnist_shift.write_multi(tiny_digits(), LABELS, prefix, 4, 4, 1, 0, 0)
    idx_dir = root / "idx"
    idx_dir.mkdir()
    write_idx(idx_dir, (tiny_digits(), LABELS), (tiny_digits(), LABELS))
    write_events(str(root / "summaries"))
    return {
        "idx_dir": str(idx_dir),
        "root": root,
        "data_dir": str(data_dir),
        "multi_dir": f"{prefix}@{len(names)}",
        "summary_dir": str(root / "summaries"),
        "checkpoint": save_tiny_capsnet(str(root / "single"), 28),
        "multi_checkpoint": save_tiny_capsnet(str(root / "multi"), 36),
    }


@pytest.fixture(scope="module")
def single_pictures(workspace):
    out = workspace["root"] / "single_out"
    paths = visualize.write_pictures(
        str(out), workspace["checkpoint"], workspace["data_dir"], workspace["summary_dir"],
        num_images=4, num_perturbed=2, image_index=5)
    return out, paths


@pytest.mark.slow
def test_single_digit_pictures_are_written_with_their_sizes(single_pictures):
    out, paths = single_pictures
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        [visualize.CURVES, visualize.CAPSULE_LENGTHS, visualize.RECONSTRUCTIONS,
         visualize.PERTURBATIONS])
    assert pixel_size(out / visualize.RECONSTRUCTIONS) == (100 + 100 * 4, 240)
    assert pixel_size(out / visualize.PERTURBATIONS) == (60 + 528 * 2 + 24, 818)
    assert pixel_size(out / visualize.CAPSULE_LENGTHS) == (800, 320)
    assert pixel_size(out / visualize.CURVES) == (1200, 800)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["records", "pairs made from IDX files"])
def test_multimnist_pictures_are_written_with_their_sizes(workspace, source):
    out = workspace["root"] / f"multi_out_{source[0]}"
    data = ({"data_dir": workspace["multi_dir"], "num_targets": 2} if source == "records"
            else {"data_dir": workspace["idx_dir"], "dataset": "multimnist"})
    paths = visualize.write_pictures(
        str(out), workspace["multi_checkpoint"], num_images=3, num_perturbed=1, **data)
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        [visualize.CAPSULE_LENGTHS, visualize.MULTIMNIST, visualize.PERTURBATIONS])
    assert pixel_size(out / visualize.MULTIMNIST) == (100 + 100 * 3, 240)
    assert pixel_size(out / visualize.PERTURBATIONS) == (60 + 528, 818)
    with Image.open(out / visualize.MULTIMNIST) as image:
        pixels = np.asarray(image.convert("RGB"), np.int32)
    assert (np.abs(pixels[..., 0] - pixels[..., 1]) > 60).any()  # coloured overlays


def test_perturbation_columns_differ_and_step_zero_is_the_reconstruction(workspace):
    model = visualize.load_capsnet(workspace["checkpoint"])
    images = visualize.read_test_examples(workspace["data_dir"], 2)["images"]
    pictures, predicted = visualize.perturbed_reconstructions(model, images)
    assert visualize.PERTURBATION_STEPS == (-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1,
                                            0.15, 0.2, 0.25)
    assert pictures.shape == (2, 16, 11, 28, 28, 1)
    steps = np.abs(np.diff(pictures, axis=2)).max(axis=(3, 4, 5))  # [image, dim, step pair]
    assert (steps > 0).all()
    plain = model.reconstruct(images, predicted).numpy()
    np.testing.assert_allclose(pictures[:, 0, 5], plain, atol=1e-5)


def test_pictures_come_from_the_checkpoint_decoder(workspace, tmp_path):
    model = CapsNet(default_hparams().replace(num_prime_capsules=1, routing=1))
    checkpoint = tf.train.Checkpoint(model=model).save(str(tmp_path / "model.ckpt"))
    images = visualize.read_test_examples(workspace["data_dir"], 2)["images"]
    restored = visualize.load_capsnet(checkpoint, hparams_override="num_prime_capsules=1,routing=1")
    np.testing.assert_allclose(restored.reconstruct(images, [0, 1]),
                               model.reconstruct(images, [0, 1]), atol=1e-6)


def test_read_scalars_reads_tensor_summaries(workspace):
    scalars = visualize.read_scalars(os.path.join(workspace["summary_dir"], "test"))
    steps, values = scalars["accuracy"]
    np.testing.assert_array_equal(steps, [40, 80, 120])
    np.testing.assert_allclose(values, [1 - 0.5 * s / 120 for s in (40, 80, 120)], rtol=1e-6)


@pytest.mark.slow
def test_model_without_decoder_gets_capsule_lengths_only(workspace):
    checkpoint = save_tiny_capsnet(str(workspace["root"] / "no_decoder"), 28, remake=False)
    paths = visualize.write_pictures(str(workspace["root"] / "no_decoder_out"), checkpoint,
                                     workspace["data_dir"], num_images=2)
    assert [os.path.basename(p) for p in paths] == [visualize.CAPSULE_LENGTHS]


def test_missing_inputs_raise_clear_errors(workspace, tmp_path):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "model.ckpt-1")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*model.ckpt-1 not found"):
        visualize.write_pictures(out, missing, workspace["data_dir"])
    with pytest.raises(FileNotFoundError, match=r"test_0shifted_mnist.tfrecords not found"):
        visualize.write_pictures(out, workspace["checkpoint"], str(tmp_path))
    with pytest.raises(ValueError, match="the test data has no example 99"):
        visualize.write_pictures(out, workspace["checkpoint"], workspace["data_dir"],
                                 num_images=2, image_index=99)
    with pytest.raises(ValueError, match="the test data has no example 9 "):
        visualize.write_pictures(out, workspace["checkpoint"], workspace["data_dir"])
    with pytest.raises(FileNotFoundError, match="no TensorBoard scalars"):
        visualize.write_pictures(out, summary_dir=str(tmp_path))


@pytest.mark.slow
def test_command_line_prints_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "capsules.visualize", f"--checkpoint={tmp_path}/model.ckpt-1",
         f"--data_dir={tmp_path}", f"--output_dir={tmp_path}/out"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 1
    missing = f"{tmp_path}/model.ckpt-1"
    assert result.stderr.splitlines()[-1:] == [
        f"visualize: error: checkpoint {missing} not found (no file {missing}.index)"]


@pytest.mark.slow
def test_damaged_inputs_raise_one_line_naming_the_file(workspace, tmp_path):
    out = str(tmp_path / "out")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    name = mnist_shift.record_name("test", 0)
    content = (Path(workspace["data_dir"]) / name).read_bytes()
    (data_dir / name).write_bytes(content[:100] + b"\xff" * 4 + content[104:])
    with pytest.raises(ValueError, match=rf"^{data_dir / name}: corrupted record"):
        visualize.write_pictures(out, workspace["checkpoint"], str(data_dir), num_images=2)
    checkpoint_dir = tmp_path / "checkpoint"
    prefix = save_tiny_capsnet(str(checkpoint_dir), 28)
    data = Path(prefix + ".data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"^checkpoint {prefix} cannot be read .*damaged"):
        visualize.write_pictures(out, str(checkpoint_dir), workspace["data_dir"], num_images=2)
    assert not os.path.exists(out) or os.listdir(out) == []  # nothing half-drawn
