"""Class ids out of range: `fit` and `reconstruct` refuse them instead of training on (or
decoding) the all-zero target tf.one_hot makes of them."""

import numpy as np
import pytest
import tensorflow as tf

from capsules import CapsNet, default_hparams


def _model() -> CapsNet:
    hparams = default_hparams().replace(padding="SAME", num_prime_capsules=2, routing=1)
    model = CapsNet(hparams, input_shape=(12, 12, 1), num_classes=3)
    model.compile()
    return model


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 12, 12, 1)).astype(np.float32)


@pytest.mark.parametrize("bad", [3, 12, -1])
@pytest.mark.slow
def test_fit_refuses_class_ids_out_of_range(bad):
    model = _model()
    before = [weight.numpy() for weight in model.trainable_weights]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"labels must be class ids in 0..2"):
        model.fit(_images(4), np.array([0, 1, bad, 2]), batch_size=4, epochs=1, verbose=0)
    for old, weight in zip(before, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(old, weight.numpy())  # no step on the bad batch
    model.fit(_images(4), np.array([0, 1, 2, 2]), batch_size=4, epochs=1, verbose=0)


@pytest.mark.parametrize("labels", [[12], [-1], [[0.0, 0.0, 0.0, 1.0]]])
def test_reconstruct_refuses_class_ids_out_of_range(labels):
    model = _model()
    with pytest.raises(ValueError, match=r"reconstruct labels must be class ids in 0..2|"
                                         r"class ids \[batch\] or"):
        model.reconstruct(_images(1), labels)


@pytest.mark.slow
def test_reconstruct_checks_ids_in_a_graph_too():
    model = _model()
    reconstruct = tf.function(model.reconstruct)
    assert reconstruct(_images(1), tf.constant([2])).shape == (1, 12, 12, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be class ids in 0..2"):
        reconstruct(_images(1), tf.Variable([3]))
