"""model.fit / evaluate / predict return as soon as their last step ends: no tf.data
autotune stall when Keras drops an iterator (docs/speed.md), for arrays and datasets, at
the end of a call, between epochs and after each validation run."""

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsules.hparams import HParams
from capsules.models import CapsNet
from input_data import builder

# Without the fix about half of these idle gaps last 0.02-0.5 s here (until the autotune
# thread's next run); with it they take a few milliseconds.
MAX_IDLE_S = 0.1


class IdleGaps(keras.callbacks.Callback):
    """Records the idle gaps where Keras drops an iterator: from the end of the last batch of
    an epoch of a finite dataset to the first batch of the next one, from the end of a
    validation run to the end of its epoch, and from the end of a call to its return."""

    def __init__(self):
        super().__init__()
        self.gaps, self.last_end = {}, None

    def _gap(self, name):
        self.gaps[f"{name} {len(self.gaps)}"] = time.perf_counter() - self.last_end

    def _end(self, *args, **kwargs):
        self.last_end = time.perf_counter()

    on_train_end = on_test_end = on_predict_end = _end

    def on_epoch_begin(self, epoch, logs=None):
        self.last_end = time.perf_counter() if epoch else None  # epoch 0: a new iterator

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0 and self.last_end is not None:
            self._gap("next epoch")
        self.last_end = None

    def on_epoch_end(self, epoch, logs=None):
        if self.last_end is not None:
            self._gap("after validation")

    def returned(self, call):
        self._gap(f"return of {call}")
        self.last_end = None


@pytest.mark.slow
def test_fit_evaluate_predict_do_not_idle_after_their_steps():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.random((96, 20, 20, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 96).astype(np.int32)
    model = CapsNet(HParams(num_prime_capsules=2, routing=1), input_shape=(20, 20, 1))
    model.compile()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).prefetch(
        tf.data.AUTOTUNE)  # autotuned, as users write it
    gaps = IdleGaps()
    model.fit(images, labels, batch_size=16, verbose=0)  # traces the steps

    history = model.fit(images, labels, batch_size=16, epochs=2, validation_split=0.25,
                        verbose=0, callbacks=[gaps])
    gaps.returned("fit(arrays, validation_split)")
    assert len(history.history["val_loss"]) == 2
    model.fit(dataset, epochs=2, validation_data=dataset.take(2), verbose=0, callbacks=[gaps])
    gaps.returned("fit(dataset, validation_data)")
    model.fit(dataset.repeat(), steps_per_epoch=5, epochs=2, verbose=0, callbacks=[gaps])
    gaps.returned("fit(repeated dataset, steps_per_epoch)")
    model.evaluate(dataset, verbose=0, callbacks=[gaps])
    gaps.returned("evaluate(dataset)")
    assert model.predict(images, batch_size=32, verbose=0, callbacks=[gaps]).shape == (96, 10)
    gaps.returned("predict(arrays)")

    assert len(gaps.gaps) == 12, gaps.gaps
    idle = {name: round(gap, 3) for name, gap in gaps.gaps.items() if gap > MAX_IDLE_S}
    assert not idle, f"idle after the last step (s): {idle}"


def test_the_package_pipelines_run_without_autotune():
    reader = builder.Reader(decode=lambda name, record: {"x": record},
                            parse_train=lambda data, seed: data, parse_eval=lambda data: data,
                            shuffle_buffer=2)
    records = tf.data.Dataset.from_tensor_slices((["file"] * 4, [1, 2, 3, 4]))
    for is_training in (True, False):
        ds = builder.build(reader, records, 2, is_training, seed=0)
        assert ds.options().autotune.enabled is False
        assert sorted(np.concatenate([b["x"] for b in ds.as_numpy_iterator()])) == [1, 2, 3, 4]
