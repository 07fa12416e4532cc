"""The reference's optimiser: Adam with an exponentially decaying learning rate."""

from __future__ import annotations

import keras
import tensorflow as tf

from capsules.hparams import HParams

_MIN_LEARNING_RATE = 1e-6


@keras.saving.register_keras_serializable(package="capsules")
class ReferenceDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = max(learning_rate * decay_rate^(step / decay_steps), 1e-6).

    The reference's `tf.train.exponential_decay` (not staircase) followed by
    `tf.maximum(..., 1e-6)`.
    """

    def __init__(self, learning_rate: float, decay_steps: int, decay_rate: float):
        self.learning_rate = learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        decayed = self.learning_rate * tf.pow(self.decay_rate, step / self.decay_steps)
        return tf.maximum(decayed, _MIN_LEARNING_RATE)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
        }


def reference_optimizer(hparams: HParams, clipvalue: float | None = None,
                        ema_momentum: float = 0.0) -> keras.optimizers.Optimizer:
    """Adam (epsilon 1e-8, TF1's default; Keras' is 1e-7) on the reference schedule.

    clipvalue: clip every gradient element to [-clipvalue, clipvalue] (the EM code's 200).
    ema_momentum: > 0 keeps a moving average of the weights with this momentum (Keras'
      `use_ema`: `finalize_variable_values` puts it into the weights); 0, none (the
      reference's).
    """
    schedule = ReferenceDecay(hparams.learning_rate, hparams.decay_steps, hparams.decay_rate)
    averaged = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum else {}
    return keras.optimizers.Adam(learning_rate=schedule, epsilon=1e-8, clipvalue=clipvalue,
                                 **averaged)
