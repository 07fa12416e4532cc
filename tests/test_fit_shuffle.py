"""CapsNet.fit hands `shuffle` to Keras only for the data Keras shuffles (arrays)."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

from capsules import CapsNet, default_hparams, models


def _tiny() -> CapsNet:
    model = CapsNet(default_hparams().replace(padding="SAME", num_prime_capsules=1, routing=1),
                    input_shape=(12, 12, 1), num_classes=5)
    model.compile()
    return model


def _data(n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return np.random.default_rng(0).random((n, 12, 12, 1)).astype(np.float32), np.arange(n) % 5


def test_fit_on_a_dataset_does_not_warn_that_shuffle_is_ignored():
    model = _tiny()
    dataset = tf.data.Dataset.from_tensors(_data())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(dataset, verbose=0)
        model.fit(dataset, verbose=0, validation_data=dataset)
    assert model.optimizer.iterations.numpy() == 2  # it trained
    assert not [w for w in caught if "shuffle" in str(w.message)], [str(w.message)
                                                                     for w in caught]


@pytest.mark.parametrize("data, shuffle, handed", [
    ("arrays", True, True), ("arrays", False, False), ("dataset", True, False),
])
def test_fit_hands_shuffle_to_keras_for_arrays_only(monkeypatch, data, shuffle, handed):
    seen = []

    def recording(x, y, sample_weight, batch_size, steps, shuffle, class_weight):
        seen.append(shuffle)
        return get_data_adapter(x, y, sample_weight, batch_size, steps, shuffle, class_weight)

    get_data_adapter = models.get_data_adapter
    monkeypatch.setattr(models, "get_data_adapter", recording)
    images, labels = _data()
    model = _tiny()
    if data == "arrays":
        model.fit(images, labels, batch_size=4, shuffle=shuffle, verbose=0)
    else:
        model.fit(tf.data.Dataset.from_tensors((images, labels)), shuffle=shuffle, verbose=0)
    assert seen == [handed]
