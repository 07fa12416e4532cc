"""The EMCapsNet shipped in checkpoints/mnist_em: weights only and small, rebuilt from its path
alone on the plan its README fixed, and it gives the README's figure on the first 500 MNIST
test images (tests/data/mnist_test_first500.npz: t10k images 0..499 and their labels, as
input_data.mnist.fetch writes them)."""

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from capsules import checkpoints
from capsules.em_hparams import EMHParams
from capsules.models import EMCapsNet
from tests.test_shipped_checkpoint import assert_weights_only

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist_em"
FIRST_500 = Path(__file__).resolve().parent / "data" / "mnist_test_first500.npz"


@pytest.fixture(scope="module")
def shipped():
    prefix = tf.train.latest_checkpoint(str(SHIPPED))
    assert prefix, f"no checkpoint in {SHIPPED}"
    return prefix, checkpoints.load_model(prefix)


def readme_figure(pattern: str) -> int:
    """The number the README states after the words of `pattern` (in bold: **N wrong**)."""
    words = r"\s+".join(map(re.escape, pattern.split()))  # the README wraps its lines
    found = re.search(words + r"[^*]*\*\*([\d,]+) wrong", (SHIPPED / "README.md").read_text())
    assert found, f"checkpoints/mnist_em/README.md states no figure for {pattern!r}"
    return int(found.group(1).replace(",", ""))


def test_weights_only_and_under_10_mb(shipped):
    prefix, _ = shipped
    assert_weights_only(prefix, 10)
    assert prefix.endswith("model.ckpt-30000")  # the plan's last step ships


def test_run_file_rebuilds_the_planned_model(shipped):
    prefix, model = shipped
    run = checkpoints.read_run_file(prefix)
    assert run.model == "em" and run.config["input_shape"] == [28, 28, 1]
    # checkpoints/mnist_em/README.md's plan: the small model with a faster decay and margin,
    # the package's defaults otherwise.
    assert run.hparams == EMHParams.preset("mnist_small").replace(
        decay_steps=2000, decay_rate=0.9, margin_steps=20000)
    assert (run.flags["seed"], run.flags["random_shift"], run.flags["validate"]) == (48, 2, True)
    assert isinstance(model, EMCapsNet) and model.hparams == run.hparams
    assert model.count_params() == 68_308


def test_first_500_test_images_give_the_readmes_figure(shipped):
    _, model = shipped
    data = np.load(FIRST_500)
    # As the readers give them: pixels scaled by 1/255 in float32.
    images = data["images"][..., None].astype(np.float32) * np.float32(1 / 255)
    predictions = np.concatenate([np.argmax(model(images[i:i + 100]).numpy(), axis=1)
                                  for i in range(0, 500, 100)])
    wrong = int(np.sum(predictions != data["labels"]))
    assert wrong == readme_figure("first 500 test images")
