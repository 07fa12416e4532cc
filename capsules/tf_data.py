"""tf.data settings shared by the package's input pipelines and its models' `fit`."""

from __future__ import annotations

import tensorflow as tf


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` with tf.data's autotuning off (its AUTOTUNE values keep their static defaults).

    Dropping an iterator of an autotuned dataset can block for up to 60 s: the iterator's
    destructor cancels tf.data's autotune thread and joins it, and the thread, woken before
    the cancellation is flagged, sleeps until its next scheduled run (TensorFlow 2.21;
    docs/speed.md). Keras drops one at the end of every fit, evaluate and predict.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)
