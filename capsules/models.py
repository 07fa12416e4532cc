"""CapsNet and the convolutional baseline as Keras 3 models, trained as the reference does.

Both models take images `[batch, height, width, depth]` and return class logits
`[batch, num_classes]` (capsule lengths for CapsNet). `fit` accepts a tf.data
Dataset of `(images, labels)` or `(images, labels, sample_weight)` (labels int class
ids `[batch]` or k-hot floats `[batch, num_classes]`, weights `[batch]`) or of the
feature dicts of `input_data.inputs`.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

# Keras' own input adapters (keras>=3,<4): fit/evaluate/predict take the data as Keras would.
from keras.src.trainers.data_adapters import (
    array_data_adapter,
    array_slicing,
    get_data_adapter,
)
from keras.src.trainers.data_adapters.data_adapter import DataAdapter

from capsules import em_layers, layers, losses
from capsules import features as keys
from capsules.em_hparams import EMHParams
from capsules.hparams import HParams
from capsules.optimizers import reference_optimizer
from capsules.tf_data import without_autotune

_PACKAGE = "capsules"


def flatten_depth_major(images: tf.Tensor) -> tf.Tensor:
    """`[batch, h, w, depth]` -> `[batch, depth * h * w]` in the reference's NCHW order."""
    return tf.reshape(tf.transpose(images, [0, 3, 1, 2]), [tf.shape(images)[0], -1])


def unflatten_depth_major(pixels: tf.Tensor, image_shape) -> tf.Tensor:
    """Inverse of `flatten_depth_major`: `[batch, depth * h * w]` -> `[batch, h, w, depth]`."""
    height, width, depth = image_shape
    return tf.transpose(tf.reshape(pixels, [-1, depth, height, width]), [0, 2, 3, 1])


class _NoAutotuneAdapter(DataAdapter):
    """Keras' data adapter of some input, its tf.data pipeline without autotune."""

    def __init__(self, adapter: DataAdapter):
        self.adapter = adapter

    @classmethod
    def of(cls, x, y=None, sample_weight=None, batch_size=None, steps=None, shuffle=False,
           class_weight=None) -> _NoAutotuneAdapter:
        if isinstance(x, cls):  # fit's validation data, handed on to evaluate
            return x
        return cls(get_data_adapter(x, y, sample_weight, batch_size, steps, shuffle,
                                    class_weight))

    def get_tf_dataset(self):
        return without_autotune(self.adapter.get_tf_dataset())

    def get_numpy_iterator(self):
        return self.adapter.get_numpy_iterator()

    def get_jax_iterator(self):
        return self.adapter.get_jax_iterator()

    def get_torch_dataloader(self):
        return self.adapter.get_torch_dataloader()

    num_batches = property(lambda self: self.adapter.num_batches)
    batch_size = property(lambda self: self.adapter.batch_size)
    has_partial_batch = property(lambda self: self.adapter.has_partial_batch)
    partial_batch_size = property(lambda self: self.adapter.partial_batch_size)

    def on_epoch_begin(self):
        self.adapter.on_epoch_begin()

    def on_epoch_end(self):
        self.adapter.on_epoch_end()


def checked_class_ids(ids: tf.Tensor, num_classes: int, name: str) -> tf.Tensor:
    """`ids` (ints `[batch]`), checked to be classes 0..num_classes-1.

    tf.one_hot makes an all-zero target of an id out of range, which trains and decodes
    silently on nothing. Known values raise ValueError at once; in a graph (model.fit) an
    assertion fails the step with the same message (XLA drops assertions, so with
    jit_compile=True the check is the eager one only).
    """
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise ValueError(f"{name} must be integer class ids, got {ids.dtype}")
    message = f"{name} must be class ids in 0..{num_classes - 1}"
    known = tf.get_static_value(ids)
    if known is not None:
        bad = np.unique(known[(known < 0) | (known >= num_classes)])
        if bad.size:
            raise ValueError(f"{message}, got {bad.tolist()}")
        return ids
    checks = [tf.debugging.assert_non_negative(ids, message=message),
              tf.debugging.assert_less(ids, tf.cast(num_classes, ids.dtype), message=message)]
    with tf.control_dependencies(checks):
        return tf.identity(ids)


class _ReferenceModel(keras.Model):
    """Training and evaluation shared by CapsNet and ConvBaseline.

    The loss is the reference's: the classification loss of `hparams.loss_type`
    plus, where the model reconstructs, 0.0005 x the per-image squared error of
    each target's reconstruction, averaged over the batch. Sample weights (Keras'
    `sample_weight` or `class_weight`, or a third element of the batches) weight
    each example's losses, as Keras' losses do (sum of weight x loss / batch size);
    the accuracy metrics count every example, as Keras' `metrics=`.

    `compile` takes the optimizer and Keras' run options, not `loss`, `metrics`,
    `loss_weights` or `weighted_metrics`; `keras.models.load_model` restores the
    model compiled as it was saved (optimizer, learning-rate schedule and state).
    A `dtype` policy given to the model is given to its layers (float32 outputs
    under a mixed policy, see the subclasses).
    """

    # The dataclass of the model's hyper-parameters; its defaults are the model's.
    hparams_class = HParams

    def __init__(
        self,
        hparams: HParams | None = None,
        input_shape=(28, 28, 1),
        num_classes: int = 10,
        num_targets: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        hparams_class = type(self).hparams_class
        self.hparams = hparams if hparams is not None else hparams_class()
        if not isinstance(self.hparams, hparams_class):
            raise ValueError(
                f"hparams of {type(self).__name__} must be {hparams_class.__module__}."
                f"{hparams_class.__name__}, got {hparams!r}"
            )
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
            raise ValueError(f"input_shape must be (height, width, depth), got {input_shape}")
        if num_targets not in (1, 2):
            raise ValueError(f"num_targets must be 1 or 2, got {num_targets!r}")
        if not isinstance(num_classes, int) or num_classes < num_targets:
            raise ValueError(f"num_classes must be an integer >= num_targets, got {num_classes!r}")
        self.image_shape = input_shape
        self.num_classes = num_classes
        self.num_targets = num_targets
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.classification_tracker = keras.metrics.Mean(name="classification_loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.correct_tracker = keras.metrics.Mean(
            name="accuracy" if num_targets == 1 else "correct"
        )
        self.almost_tracker = keras.metrics.Mean(name="almost")

    # -- to be defined by the models ------------------------------------------------
    def _forward(self, images: tf.Tensor, training: bool):
        """Returns (logits, embedding for the reconstruction or None)."""
        raise NotImplementedError

    def _reconstruction_losses(self, embedding, targets, sample_weight) -> list:
        return []

    def _full_precision_policy(self) -> keras.DTypePolicy:
        """The policy of the layers that give the logits and the losses: the model's
        variable dtype (float32 under a mixed policy; float64 for a float64 model)."""
        return keras.DTypePolicy(self.dtype_policy.variable_dtype)

    def _reconstructs(self) -> bool:
        return False

    # -- Keras ----------------------------------------------------------------------
    def call(self, inputs, training=None):
        images = inputs[keys.IMAGES] if isinstance(inputs, dict) else inputs
        logits, _ = self._forward(images, training=training)
        return logits

    def compile(self, optimizer=None, loss=None, metrics=None, loss_weights=None,
                weighted_metrics=None, **kwargs):
        """As keras.Model.compile; with no optimizer, Adam on the reference's schedule.

        The model computes its own loss and metrics: a `loss`, `metrics`,
        `loss_weights` or `weighted_metrics` raises ValueError.
        """
        given = {name: value for name, value in (
            ("loss", loss), ("metrics", metrics), ("loss_weights", loss_weights),
            ("weighted_metrics", weighted_metrics)) if value is not None}
        if given:
            name, value = next(iter(given.items()))
            raise ValueError(
                f"{type(self).__name__}.compile() takes no {name}, got {name}={value!r}: the "
                f"model computes its own loss (hparams.loss_type={self.hparams.loss_type!r}"
                f"{' plus the reconstruction loss' if self._reconstructs() else ''}) and "
                f"metrics ({', '.join(metric.name for metric in self.metrics)})"
            )
        if optimizer is None:
            optimizer = reference_optimizer(self.hparams)
        super().compile(optimizer=optimizer, **kwargs)
        # Built now (the models build themselves): a saved model then always holds the
        # optimizer's variables, which load_model's compiled copy expects to load.
        self.optimizer.build(self.trainable_variables)

    def compile_from_config(self, config):
        """Compiles as `get_compile_config` saved it (Keras calls it in `load_model`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def metrics(self):
        trackers = [
            self.loss_tracker,
            self.classification_tracker,
            self.reconstruction_tracker,
            self.correct_tracker,
        ]
        return trackers + ([self.almost_tracker] if self.num_targets == 2 else [])

    def compute_losses(self, data, training: bool = False) -> dict:
        """Forward pass and the reference's losses on one batch.

        Returns a dict of scalars 'loss', 'classification_loss',
        'reconstruction_loss', plus 'logits' `[batch, num_classes]` and
        'labels' (k-hot floats).
        """
        images, labels, targets, sample_weight = self._unpack(data)
        logits, embedding = self._forward(images, training=training)
        classification = losses.classification_loss(
            labels, logits, self.hparams.loss_type, self.hparams.loss_form, sample_weight
        )
        reconstruction = tf.add_n(
            [tf.zeros([], classification.dtype)]
            + self._reconstruction_losses(embedding, targets, sample_weight)
        )
        return {
            "loss": classification + reconstruction,
            "classification_loss": classification,
            "reconstruction_loss": reconstruction,
            "logits": logits,
            "labels": labels,
        }

    def optimize_step(self, data) -> dict:
        """One optimizer step on a batch; returns `batch_results` of its forward pass."""
        with tf.GradientTape() as tape:
            results = self.compute_losses(data, training=True)
            # Gradients are summed over replicas; the reference averages its towers.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = results["loss"] / replicas
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self.batch_results(results)

    def batch_results(self, results: dict) -> dict:
        """Scalars of one batch: the losses, and the fraction 'accuracy' (one target) or
        'correct' and 'almost' (two targets) of the reference's `evaluate`."""
        found = losses.count_found_targets(results["labels"], results["logits"], self.num_targets)
        scalars = {
            name: results[name] for name in ("loss", "classification_loss", "reconstruction_loss")
        }
        scalars[self.correct_tracker.name] = tf.reduce_mean(
            tf.cast(found == self.num_targets, tf.float32)
        )
        if self.num_targets == 2:
            scalars["almost"] = tf.reduce_mean(tf.cast(found >= 1, tf.float32))
        return scalars

    def train_step(self, data):
        return self._update_metrics(data, self.optimize_step(data))

    def test_step(self, data):
        return self._update_metrics(data, self.batch_results(self.compute_losses(data)))

    def _update_metrics(self, data, scalars):
        # Weighted by batch size: epoch figures are means over examples, also
        # when the last batch is smaller.
        images = data[keys.IMAGES] if isinstance(data, dict) else tf.nest.flatten(data[0])[0]
        batch_size = tf.cast(tf.shape(images)[0], tf.float32)
        for metric in self.metrics:
            metric.update_state(scalars[metric.name], sample_weight=batch_size)
        return {metric.name: metric.result() for metric in self.metrics}

    # -- Input without tf.data's autotune stall (docs/speed.md) -------------------------
    # Keras drops its tf.data iterator at the end of every fit, evaluate and predict, and of
    # every epoch of a finite dataset; with autotune on, that can block for up to 60 s in
    # TensorFlow 2.21 (capsules.tf_data.without_autotune). So whatever these receive
    # (arrays, datasets, generators) goes through Keras' own adapter, its pipeline
    # without autotune.
    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            validation_split=0.0, validation_data=None, shuffle=True, class_weight=None,
            sample_weight=None, initial_epoch=0, steps_per_epoch=None, validation_steps=None,
            validation_batch_size=None, validation_freq=1):
        if validation_split and validation_data is None:  # as keras.Model.fit does
            (x, y, sample_weight), validation_data = array_slicing.train_validation_split(
                (x, y, sample_weight), validation_split=validation_split)
        if validation_data is not None:
            validation_data = _NoAutotuneAdapter.of(
                *keras.utils.unpack_x_y_sample_weight(validation_data),
                batch_size=validation_batch_size or batch_size, steps=validation_steps)
        # Keras shuffles arrays and a PyDataset; to a dataset or generator (shuffled by its
        # maker) it would only warn, on every call, that shuffle=True is ignored.
        shuffle = shuffle and (array_data_adapter.can_convert_arrays((x, y, sample_weight))
                               or isinstance(x, keras.utils.PyDataset))
        data = _NoAutotuneAdapter.of(x, y, sample_weight, batch_size, steps_per_epoch, shuffle,
                                     class_weight)
        return super().fit(data, epochs=epochs, verbose=verbose, callbacks=callbacks,
                           validation_data=validation_data, initial_epoch=initial_epoch,
                           steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                           validation_freq=validation_freq)

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None,
                 steps=None, **kwargs):
        data = _NoAutotuneAdapter.of(x, y, sample_weight, batch_size, steps)
        return super().evaluate(data, verbose=verbose, steps=steps, **kwargs)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        data = _NoAutotuneAdapter.of(x, batch_size=batch_size, steps=steps)
        return super().predict(data, verbose=verbose, steps=steps, callbacks=callbacks)

    def _unpack(self, data):
        """(images, k-hot labels, [(target label ids, target images), ...], sample weights
        `[batch]` or None) from a batch.

        A batch is a feature dict of `input_data.inputs` (targets recons_* and,
        for two targets, spare_*) or `(images, labels[, sample_weight])`, whose
        targets are the labelled classes, each reconstructing the input image.
        """
        if isinstance(data, dict):
            images, labels = data[keys.IMAGES], self._k_hot(data[keys.LABELS])
            targets = [(data[keys.RECONS_LABEL], data[keys.RECONS_IMAGE])]
            if self.num_targets == 2:
                targets.append((data[keys.SPARE_LABEL], data[keys.SPARE_IMAGE]))
            return images, labels, targets, None
        if not isinstance(data, (tuple, list)) or len(data) < 2:
            raise ValueError(
                "expected batches of (images, labels) or input_data feature dicts, "
                f"got {type(data).__name__}"
            )
        images, labels = data[0], self._k_hot(data[1])
        if isinstance(images, dict):
            images = images[keys.IMAGES]
        label_ids = tf.math.top_k(labels, k=self.num_targets).indices
        targets = [(label_ids[:, i], images) for i in range(self.num_targets)]
        sample_weight = data[2] if len(data) > 2 else None
        if sample_weight is not None:
            sample_weight = tf.convert_to_tensor(sample_weight)
            if sample_weight.shape.rank not in (1, 2) or sample_weight.shape[1:] not in ([], [1]):
                raise ValueError(
                    "sample_weight must be one weight per image, [batch] or [batch, 1], got "
                    f"shape {sample_weight.shape}"
                )
            sample_weight = tf.reshape(sample_weight, [-1])
        return images, labels, targets, sample_weight

    def _k_hot(self, labels) -> tf.Tensor:
        """Int class ids `[batch]` -> one-hot; k-hot `[batch, num_classes]` checked and cast."""
        labels = tf.convert_to_tensor(labels)
        if labels.shape.rank == 1 or (labels.shape.rank == 2 and labels.shape[-1] == 1):
            if not labels.dtype.is_integer:
                raise ValueError(
                    f"labels of shape {labels.shape} must be integer class ids, got {labels.dtype}"
                )
            ids = checked_class_ids(tf.reshape(labels, [-1]), self.num_classes, "labels")
            return tf.one_hot(ids, self.num_classes)
        if labels.shape.rank != 2 or labels.shape[-1] != self.num_classes:
            raise ValueError(
                f"labels must be class ids [batch] or k-hot [batch, {self.num_classes}] "
                f"for a model of {self.num_classes} classes, got shape {labels.shape}"
            )
        return tf.cast(labels, tf.float32)

    def get_config(self):
        return {
            "name": self.name,
            "hparams": self.hparams.to_dict(),
            "input_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "num_targets": self.num_targets,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["hparams"] = cls.hparams_class.from_dict(config["hparams"])
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CapsNet(_ReferenceModel):
    """The paper's CapsNet (the reference's CapsuleModel).

    conv1 (256 channels, 9x9, ReLU) -> primary capsules (num_prime_capsules types
    of 8 atoms, 9x9, stride 2) -> class capsules (num_classes x 16, routing
    iterations from hparams) -> lengths. With hparams.remake, a decoder
    reconstructs each target from its masked class capsule (pixels in the
    reference's depth-major order).

    Args:
      hparams: `capsules.hparams.HParams` (num_prime_capsules, padding, leaky,
        routing, remake, loss_type, loss_form); default the reference's.
      input_shape: (height, width, depth) of the images.
      num_classes: class capsules.
      num_targets: objects per image (2 for MultiMNIST: metrics 'correct' and 'almost').

    Call: images `[batch, height, width, depth]` -> lengths `[batch, num_classes]`.

    The model's dtype policy (`dtype=`, else the global one) goes to conv1 and the
    capsule layers; the lengths and the decoder get its variable dtype (float32
    under `mixed_bfloat16`).
    """

    def __init__(self, hparams=None, input_shape=(28, 28, 1), num_classes=10, num_targets=1,
                 **kwargs):
        super().__init__(hparams, input_shape, num_classes, num_targets, **kwargs)
        hp = self.hparams
        self.conv1 = keras.layers.Conv2D(
            256,
            9,
            padding=hp.padding.lower(),
            activation="relu",
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.05),
            bias_initializer=keras.initializers.Constant(0.1),
            dtype=self.dtype_policy,
            name="conv1",
        )
        self.primary_capsules = layers.PrimaryCapsule(
            hp.num_prime_capsules, 8, kernel_size=9, strides=2, padding=hp.padding,
            leaky=hp.leaky, dtype=self.dtype_policy, name="conv_capsule1",
        )
        self.class_capsules = layers.Capsule(
            num_classes, 16, num_routing=hp.routing, leaky=hp.leaky, dtype=self.dtype_policy,
            name="capsule2",
        )
        # Lengths and decoder stay float32 under a mixed policy (the logits and the
        # losses are float32; they cost under 1% of the FLOPs).
        self.length = layers.Length(dtype=self._full_precision_policy(), name="length")
        self.decoder = (
            layers.ReconstructionDecoder(
                input_shape[0] * input_shape[1] * input_shape[2],
                dtype=self._full_precision_policy(), name="recons",
            )
            if hp.remake
            else None
        )
        self.build((None, *input_shape))

    def build(self, input_shape):
        self.conv1.build(input_shape)
        shape = self.conv1.compute_output_shape(input_shape)
        self.primary_capsules.build(shape)
        shape = self.primary_capsules.compute_output_shape(shape)
        self.class_capsules.build(shape)
        shape = self.class_capsules.compute_output_shape(shape)
        if self.decoder is not None:
            self.decoder.build([shape, shape[:2]])
        self.built = True

    def class_capsule_outputs(self, images, training=False) -> tf.Tensor:
        """Class capsules `[batch, num_classes, 16]` of images `[batch, h, w, depth]`."""
        hidden = self.conv1(images, training=training)
        primary = self.primary_capsules(hidden, training=training)
        return self.class_capsules(primary, training=training)

    def _forward(self, images, training):
        capsules = self.class_capsule_outputs(images, training=training)
        return self.length(capsules), capsules

    def _reconstruction_losses(self, capsules, targets, sample_weight):
        if self.decoder is None:
            return []
        return [
            losses.reconstruction_loss(
                self.decoder([capsules, tf.one_hot(label, self.num_classes)]),
                tf.cast(flatten_depth_major(image), self.decoder.compute_dtype),
                sample_weight,
            )
            for label, image in targets
        ]

    def _reconstructs(self):
        return self.decoder is not None

    def reconstruct(self, images, labels) -> tf.Tensor:
        """Decoder images `[batch, h, w, depth]` from the capsule of `labels`.

        labels: class ids `[batch]` or one-hot `[batch, num_classes]` (argmax taken).
        """
        if self.decoder is None:
            raise ValueError("this CapsNet has no decoder (hparams.remake=False)")
        labels = tf.convert_to_tensor(labels)
        if labels.shape.rank == 2:
            labels = tf.argmax(labels, axis=-1)
        labels = checked_class_ids(labels, self.num_classes, "reconstruct labels")
        capsules = self.class_capsule_outputs(images)
        pixels = self.decoder([capsules, tf.one_hot(labels, self.num_classes)])
        return unflatten_depth_major(pixels, self.image_shape)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvBaseline(_ReferenceModel):
    """The reference's convolutional baseline (models/conv_model.py).

    Two blocks of 5x5 convolution (512, then 256 channels, ReLU, padding from
    hparams) and 2x2 max pooling (stride 2, SAME), flattened in the reference's
    NCHW order, a 1024-unit ReLU layer and a linear layer of num_classes logits.

    The model's dtype policy goes to every layer but the logits' (its variable
    dtype: float32 under `mixed_bfloat16`).
    """

    def __init__(self, hparams=None, input_shape=(28, 28, 1), num_classes=10, num_targets=1,
                 **kwargs):
        super().__init__(hparams, input_shape, num_classes, num_targets, **kwargs)
        padding = self.hparams.padding.lower()
        weights = keras.initializers.TruncatedNormal(stddev=0.1)
        biases = keras.initializers.Constant(0.1)
        # Attributes, not lists: tf.train.Checkpoint does not follow Keras 3's lists.
        for i, channels in enumerate((512, 256)):
            setattr(self, f"conv{i + 1}", keras.layers.Conv2D(
                channels, 5, padding=padding, activation="relu",
                kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.05),
                bias_initializer=biases, dtype=self.dtype_policy, name=f"conv{i + 1}",
            ))
            setattr(self, f"pool{i + 1}", keras.layers.MaxPooling2D(
                2, 2, padding="same", dtype=self.dtype_policy, name=f"pool{i + 1}"))
        self.fc1 = keras.layers.Dense(
            1024, activation="relu", kernel_initializer=weights, bias_initializer=biases,
            dtype=self.dtype_policy, name="fc1",
        )
        self.softmax_layer = keras.layers.Dense(
            num_classes, kernel_initializer=weights, bias_initializer=biases,
            dtype=self._full_precision_policy(), name="softmax_layer",
        )
        self.build((None, *input_shape))

    @property
    def convs(self) -> list[keras.layers.Conv2D]:
        return [self.conv1, self.conv2]

    @property
    def pools(self) -> list[keras.layers.MaxPooling2D]:
        return [self.pool1, self.pool2]

    def build(self, input_shape):
        shape = input_shape
        for conv, pool in zip(self.convs, self.pools, strict=True):
            conv.build(shape)
            shape = pool.compute_output_shape(conv.compute_output_shape(shape))
        self.fc1.build((None, shape[1] * shape[2] * shape[3]))
        self.softmax_layer.build((None, 1024))
        self.built = True

    def _forward(self, images, training):
        hidden = images
        for conv, pool in zip(self.convs, self.pools, strict=True):
            hidden = pool(conv(hidden))
        hidden = flatten_depth_major(hidden)
        return self.softmax_layer(self.fc1(hidden)), None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EMCapsNet(_ReferenceModel):
    """Matrix capsules with EM routing (Hinton, Sabour and Frosst, 2018; the official capsule_em).

    ReLU convolution (A channels, 5x5, stride 2, VALID) -> primary matrix capsules
    (B types, 1x1) -> convolutional capsules (C types, K=3, stride 2) -> convolutional
    capsules (D types, K=3, stride 1) -> class capsules (one per class, coordinate
    addition), EM routing with `hparams.routing` iterations in the last three. The
    logits are the class capsules' activations. Loss: the spread loss, its margin
    rising from margin_start to margin_end over margin_steps steps, plus weight decay
    on the kernels; Adam on the official schedule with gradients clipped at +-200, keeping
    the weights' moving average that evaluation uses (`hparams.ema_momentum`).

    Args:
      hparams: `capsules.em_hparams.EMHParams`; default `EMHParams()`, the recipe that
        learns (`EMHParams.preset("smallnorb_official")`: every official value).
      input_shape: (height, width, depth) of the images (smallNORB: 32x32x2).
      num_classes: class capsules.
      num_targets: labelled classes per image (the spread loss pairs each with every
        unlabelled class).

    Call: images `[batch, height, width, depth]` -> activations `[batch, num_classes]`.

    Example:
      >>> model = EMCapsNet()  # 316,650 parameters, smallNORB
      >>> model.compile()
      >>> model.fit(images, labels, batch_size=64)  # labels: class ids or one-hot
    """

    hparams_class = EMHParams

    def __init__(self, hparams=None, input_shape=(32, 32, 2), num_classes=5, num_targets=1,
                 **kwargs):
        super().__init__(hparams, input_shape, num_classes, num_targets, **kwargs)
        hp = self.hparams
        # The official simple_model.add_convs: truncated normal 0.05, biases 0.1.
        self.conv1 = keras.layers.Conv2D(
            hp.conv1_channels, 5, strides=2, padding="valid",
            activation=None if hp.conv1_batch_norm else "relu",
            use_bias=not hp.conv1_batch_norm,  # batch norm's mean removes a bias
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.05),
            bias_initializer=keras.initializers.Constant(0.1), dtype=self.dtype_policy,
            name="conv1",
        )
        # Synchronized: the statistics of the global batch, so that workers train as one
        # process would (per-replica statistics differ with the split).
        self.conv1_norm = keras.layers.BatchNormalization(
            epsilon=1e-3, synchronized=True, dtype=self.dtype_policy, name="conv1_norm"
        ) if hp.conv1_batch_norm else None
        self.primary_capsules = em_layers.PrimaryMatrixCapsule(
            hp.primary_capsules, dtype=self.dtype_policy, name="primary_capsules"
        )
        routed = dict(
            num_routing=hp.routing, variance_floor=hp.variance_floor, dtype=self.dtype_policy,
        )
        # An initializer per layer: one seeded initializer draws the same values every call.
        self.conv_capsules1 = em_layers.ConvMatrixCapsule(
            hp.conv_capsules1, kernel_size=3, strides=2, name="conv_capsules1",
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=hp.conv_kernel_stddev),
            final_lambda=hp.final_lambda, **routed,
        )
        self.conv_capsules2 = em_layers.ConvMatrixCapsule(
            hp.conv_capsules2, kernel_size=3, strides=1, name="conv_capsules2",
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=hp.conv_kernel_stddev),
            final_lambda=hp.final_lambda, **routed,
        )
        self.class_capsules = em_layers.ClassMatrixCapsule(
            num_classes, coordinate_addition=hp.coordinate_addition,
            final_lambda=hp.class_final_lambda, cost_scale=hp.class_cost_scale,
            kernel_initializer=keras.initializers.TruncatedNormal(
                stddev=hp.class_kernel_stddev),
            name="class_capsules", **routed,
        )
        self.build((None, *input_shape))

    @property
    def capsule_layers(self) -> list[keras.layers.Layer]:
        return [self.primary_capsules, self.conv_capsules1, self.conv_capsules2,
                self.class_capsules]

    def build(self, input_shape):
        self.conv1.build(input_shape)
        shape = self.conv1.compute_output_shape(input_shape)
        if self.conv1_norm is not None:
            self.conv1_norm.build(shape)
        for layer in self.capsule_layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.built = True

    def compile(self, optimizer=None, **kwargs):
        """As keras.Model.compile; with no optimizer, Adam on the official schedule and
        clipping, with the weights' moving average of `hparams.ema_momentum`."""
        if optimizer is None:
            optimizer = reference_optimizer(self.hparams, clipvalue=self.hparams.gradient_clip,
                                            ema_momentum=self.hparams.ema_momentum)
        super().compile(optimizer=optimizer, **kwargs)

    @property
    def metrics(self):
        return [self.loss_tracker, self.classification_tracker, self.correct_tracker] + (
            [self.almost_tracker] if self.num_targets == 2 else []
        )

    def class_capsule_outputs(self, images, training=False) -> tuple[tf.Tensor, tf.Tensor]:
        """Class capsules of images: poses `[batch, num_classes, 4, 4]` and activations
        `[batch, num_classes]`."""
        capsules = self.conv1(images, training=training)
        if self.conv1_norm is not None:
            capsules = tf.nn.relu(self.conv1_norm(capsules, training=training))
        for layer in self.capsule_layers:
            capsules = layer(capsules, training=training)
        return capsules

    def _forward(self, images, training):
        poses, activations = self.class_capsule_outputs(images, training=training)
        return activations, poses

    def margin(self) -> tf.Tensor:
        """The spread loss's margin at the optimizer's step (margin_end before compile)."""
        hp = self.hparams
        if getattr(self, "optimizer", None) is None:
            return tf.constant(hp.margin_end)
        progress = tf.cast(self.optimizer.iterations, tf.float32) / hp.margin_steps
        return hp.margin_start + (hp.margin_end - hp.margin_start) * tf.minimum(progress, 1.0)

    @property
    def kernels(self) -> list:
        """The weights under weight decay: every kernel, not the biases or betas."""
        return [self.conv1.kernel, self.primary_capsules.pose_kernel,
                self.primary_capsules.activation_kernel, self.conv_capsules1.kernel,
                self.conv_capsules2.kernel, self.class_capsules.kernel]

    def compute_losses(self, data, training: bool = False) -> dict:
        """Spread loss and weight decay on one batch (dict as `_ReferenceModel.compute_losses`)."""
        images, labels, _, sample_weight = self._unpack(data)
        activations, _ = self._forward(images, training=training)
        spread = losses.spread_loss(labels, activations, self.margin(), sample_weight)
        # The official tf.nn.l2_loss: sum(w^2) / 2.
        decay = self.hparams.weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in self.kernels])
        return {
            "loss": spread + decay,
            "classification_loss": spread,
            "reconstruction_loss": tf.zeros([], spread.dtype),
            "logits": activations,
            "labels": labels,
        }


MODELS = {"capsule": CapsNet, "baseline": ConvBaseline, "em": EMCapsNet}


def build_model(name: str, hparams, info) -> _ReferenceModel:
    """The model `name` (a key of MODELS) for the images of an `input_data.DatasetInfo`.

    hparams: of the model's `hparams_class`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(MODELS)}")
    return MODELS[name](
        hparams, input_shape=(info.height, info.width, info.depth),
        num_classes=info.num_classes, num_targets=info.num_targets,
    )
