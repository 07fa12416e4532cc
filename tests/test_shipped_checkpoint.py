"""The CapsNet shipped in checkpoints/mnist: weights only, complete, and it reads digits."""

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import input_data
from capsules import CapsNet, checkpoints

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist"


@pytest.fixture(scope="module")
def shipped():
    prefix = tf.train.latest_checkpoint(str(SHIPPED))
    assert prefix, f"no checkpoint in {SHIPPED}"
    model = CapsNet(checkpoints.saved_hparams(prefix))
    checkpoints.restore_weights(model, prefix)
    return prefix, model


def test_weights_only_and_under_40_mb(shipped):
    prefix, model = shipped
    names = [name for name, _ in tf.train.list_variables(prefix)]
    assert not any("optimizer" in name for name in names)
    size = sum(os.path.getsize(path) for path in tf.io.gfile.glob(prefix + "*"))
    assert size < 40 * 2**20
    # Every weight of the model, decoder included, is in the checkpoint (none at its init).
    assert not np.allclose(model.decoder.recons_3.bias.numpy(), 0.1)


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
