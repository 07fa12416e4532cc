"""Keras 3 capsule layers ("Dynamic Routing Between Capsules", Sabour et al., 2017).

Weight layouts match the reference implementation (Sarasra/models,
research/capsules/models/layers/layers.py) so that its trained variables can be
assigned directly: convolution kernels `[k, k, input_atoms, num_capsules * atoms]`
with output channel = capsule * atoms + atom, fully connected capsule weights
`[input_dim, input_atoms, num_capsules * atoms]`, biases `[num_capsules, atoms]`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from capsules import ops
from capsules.conv import conv_output_length, patch_conv2d

_PACKAGE = "capsules"


def _reference_weight_initializer(stddev: float = 0.1) -> keras.initializers.Initializer:
    # The reference's variables.weight_variable: truncated normal, stddev 0.1.
    return keras.initializers.TruncatedNormal(stddev=stddev)


def _reference_bias_initializer() -> keras.initializers.Initializer:
    # The reference's variables.bias_variable: constant 0.1.
    return keras.initializers.Constant(0.1)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {name}={value!r}")


class _RoutedCapsule(keras.layers.Layer):
    """Base of the capsule layers: votes from the layer below, then routing by agreement.

    Subclasses define the kernel shape and `_votes`; this base owns the
    arguments, the weights, the routing and the config. Under a mixed dtype
    policy the votes use the compute dtype and the routing (and the output)
    the float32 variable dtype.
    """

    def __init__(
        self,
        num_capsules: int,
        atoms: int,
        num_routing: int = 3,
        leaky: bool = False,
        kernel_initializer="reference",
        bias_initializer="reference",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive(num_capsules=num_capsules, atoms=atoms, num_routing=num_routing)
        self.num_capsules = num_capsules
        self.atoms = atoms
        self.num_routing = num_routing
        self.leaky = bool(leaky)
        self.kernel_initializer = (
            _reference_weight_initializer()
            if kernel_initializer == "reference"
            else keras.initializers.get(kernel_initializer)
        )
        self.bias_initializer = (
            _reference_bias_initializer()
            if bias_initializer == "reference"
            else keras.initializers.get(bias_initializer)
        )

    def _kernel_shape(self, input_shape) -> tuple[int, ...]:
        raise NotImplementedError

    def _check_input_shape(self, input_shape) -> None:
        raise NotImplementedError

    def build(self, input_shape):
        self._check_input_shape(input_shape)
        self.kernel = self.add_weight(
            name="kernel",
            shape=self._kernel_shape(input_shape),
            initializer=self.kernel_initializer,
        )
        # Not autocast: under a mixed policy the routing runs in the variable dtype.
        self.bias = self.add_weight(
            name="bias", shape=(self.num_capsules, self.atoms), initializer=self.bias_initializer,
            autocast=False,
        )

    def _votes(self, inputs: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def call(self, inputs):
        # Under a mixed policy (e.g. keras' "mixed_bfloat16") the votes are computed in
        # the low-precision compute dtype and routed in the float32 variable dtype: the
        # softmax, squash and agreements need float32's range and precision.
        votes = tf.cast(self._votes(inputs), self.variable_dtype)
        return ops._update_routing_output_major(votes, self.bias, self.num_routing, self.leaky)

    def compute_output_spec(self, inputs):
        # The output is routed in the variable dtype (float32 under a mixed policy), not
        # in the compute dtype Keras would assume.
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype=self.variable_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_capsules=self.num_capsules,
            atoms=self.atoms,
            num_routing=self.num_routing,
            leaky=self.leaky,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Capsule(_RoutedCapsule):
    """Fully connected capsule layer with dynamic routing (the reference's `capsule`).

    Each input capsule i votes for each output capsule j with u_hat_j|i = W_ij u_i,
    and the votes are combined by routing by agreement (`ops.update_routing`, eq. 2 and
    procedure 1):
        v_j = squash(sum_i c_ij u_hat_j|i + b_j).

    Args:
      num_capsules: output capsules (classes for the last layer).
      atoms: dimensions of each output capsule.
      num_routing: routing iterations (>= 1).
      leaky: leaky routing.
      kernel_initializer, bias_initializer: default "reference" (truncated normal
        stddev 0.1, constant 0.1).

    Weights: kernel `[input_dim, input_atoms, num_capsules * atoms]`, bias `[num_capsules, atoms]`.
    Input shape: `[batch, input_dim, input_atoms]`.
    Output shape: `[batch, num_capsules, atoms]`.
    """

    def _check_input_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                f"{self.__class__.__name__} expects input [batch, input_dim, input_atoms] "
                f"with known input_dim and input_atoms, got shape {tuple(input_shape)}"
            )

    def _kernel_shape(self, input_shape):
        return (input_shape[1], input_shape[2], self.num_capsules * self.atoms)

    def build(self, input_shape):
        super().build(input_shape)
        self.input_spec = keras.InputSpec(ndim=3, axes={1: input_shape[1], 2: input_shape[2]})

    def _votes(self, inputs):
        """Votes `[batch, num_capsules, input_dim, atoms]`, the layout in which the layers route."""
        # One matmul batched over the input capsules, [i, b, c] x [i, c, j * k] ->
        # [i, b, j * k], instead of the reference's tile + multiply + reduce_sum; same
        # values, and faster on CPU than the equivalent einsum "bic,icjk->bjik".
        votes = tf.matmul(tf.transpose(inputs, [1, 0, 2]), self.kernel)
        votes = tf.reshape(votes, [inputs.shape[1], -1, self.num_capsules, self.atoms])
        return tf.transpose(votes, [1, 2, 0, 3])

    def compute_output_shape(self, input_shape):
        self._check_input_shape(input_shape)
        return (input_shape[0], self.num_capsules, self.atoms)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvCapsule(_RoutedCapsule):
    """Convolutional capsule layer with routing (the reference's `conv_slim_capsule`).

    One kernel, shared over positions and over the input capsule types, turns
    each input capsule into votes for every output capsule type at every output
    position; routing (per position) combines them:
        v_j(x, y) = squash(sum_i c_ij(x, y) conv(u_i, W_j)(x, y) + b_j).
    The convolution is `conv.patch_conv2d`: `tf.nn.conv2d`'s values, computed as
    gathered patches x kernel (faster to train on CPU, more memory; see capsules/conv.py).

    Args:
      num_capsules: output capsule types.
      atoms: dimensions of each output capsule.
      kernel_size, strides: of the convolution (reference: 5 and 2; primary capsules 9 and 2).
      padding: "VALID" or "SAME" (case-insensitive).
      num_routing, leaky, kernel_initializer, bias_initializer: as `Capsule`.

    Weights: kernel `[kernel_size, kernel_size, input_atoms, num_capsules * atoms]`
      (output channel = capsule * atoms + atom), bias `[num_capsules, atoms]`.
    Input shape: `[batch, height, width, input_dim, input_atoms]`.
    Output shape: `[batch, out_height, out_width, num_capsules, atoms]`.
    """

    def __init__(
        self,
        num_capsules: int,
        atoms: int,
        kernel_size: int = 5,
        strides: int = 2,
        padding: str = "SAME",
        num_routing: int = 3,
        leaky: bool = False,
        kernel_initializer="reference",
        bias_initializer="reference",
        **kwargs,
    ):
        super().__init__(
            num_capsules,
            atoms,
            num_routing=num_routing,
            leaky=leaky,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )
        _check_positive(kernel_size=kernel_size, strides=strides)
        if not isinstance(padding, str) or padding.upper() not in ("VALID", "SAME"):
            raise ValueError(f"`padding` must be 'VALID' or 'SAME', got padding={padding!r}")
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding.upper()

    def _check_input_shape(self, input_shape):
        if len(input_shape) != 5 or any(d is None for d in input_shape[3:]):
            raise ValueError(
                f"{self.__class__.__name__} expects input [batch, height, width, input_dim, "
                f"input_atoms] with known input_dim and input_atoms, got shape "
                f"{tuple(input_shape)}"
            )

    def _kernel_shape(self, input_shape):
        return (self.kernel_size, self.kernel_size, input_shape[4], self.num_capsules * self.atoms)

    def build(self, input_shape):
        super().build(input_shape)
        self.input_spec = keras.InputSpec(ndim=5, axes={3: input_shape[3], 4: input_shape[4]})

    def _votes(self, inputs):
        """Votes `[batch, out_height, out_width, num_capsules, input_dim, atoms]`.

        One convolution over the input capsules stacked on the batch axis, then
        input_dim moved next to the atoms (the layout in which the layers route).
        """
        _, height, width, input_dim, input_atoms = inputs.shape
        batch = tf.shape(inputs)[0]
        if input_dim == 1:
            # A squeeze, not a slice: its gradient is a reshape rather than a copy.
            per_capsule = tf.squeeze(inputs, axis=3)
        else:
            per_capsule = tf.reshape(
                tf.transpose(inputs, [0, 3, 1, 2, 4]), [-1, height, width, input_atoms]
            )
        conv = patch_conv2d(per_capsule, self.kernel, self.strides, self.padding)
        votes = tf.reshape(
            conv, [batch, input_dim, conv.shape[1], conv.shape[2], self.num_capsules, self.atoms]
        )
        return tf.transpose(votes, [0, 2, 3, 4, 1, 5])

    def compute_output_shape(self, input_shape):
        self._check_input_shape(input_shape)
        return self._capsule_grid_shape(input_shape)

    def _capsule_grid_shape(self, input_shape) -> tuple:
        """`[batch, out_height, out_width, num_capsules, atoms]` for a 5-D input shape."""
        out_height, out_width = (
            conv_output_length(length, self.kernel_size, self.strides, self.padding)
            for length in input_shape[1:3]
        )
        return (input_shape[0], out_height, out_width, self.num_capsules, self.atoms)

    def get_config(self):
        config = super().get_config()
        config.update(kernel_size=self.kernel_size, strides=self.strides, padding=self.padding)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PrimaryCapsule(ConvCapsule):
    """Primary capsules: a convolution whose channels are grouped into squashed capsules.

    The reference builds them as `conv_slim_capsule` with one input capsule (the
    conv1 feature map, input_atoms = channels) and one routing iteration. With
    zero logits the single iteration routes 1/num_capsules of each vote
    (1/(num_capsules + 1) when leaky), so the output is
        v = squash(conv(x, W) / num_capsules + b).
    That scale is kept: the reference's trained weights expect it.

    Args:
      num_capsules: capsule types (32 in the paper; 64 for CIFAR10).
      atoms: dimensions of each capsule (8).
      kernel_size, strides, padding, leaky, initializers: as `ConvCapsule`.
      flatten: if True, return `[batch, num_capsules * out_height * out_width, atoms]`
        in the reference's order (capsule type outermost, then row, then column),
        ready for `Capsule`; if False, `[batch, out_height, out_width, num_capsules, atoms]`.

    Input shape: `[batch, height, width, channels]`.
    """

    def __init__(
        self,
        num_capsules: int,
        atoms: int,
        kernel_size: int = 9,
        strides: int = 2,
        padding: str = "VALID",
        leaky: bool = False,
        flatten: bool = True,
        kernel_initializer="reference",
        bias_initializer="reference",
        **kwargs,
    ):
        super().__init__(
            num_capsules,
            atoms,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            num_routing=1,
            leaky=leaky,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )
        self.flatten = bool(flatten)

    def _check_input_shape(self, input_shape):
        if len(input_shape) != 4 or input_shape[3] is None:
            raise ValueError(
                f"{self.__class__.__name__} expects input [batch, height, width, channels] "
                f"with known channels, got shape {tuple(input_shape)}"
            )

    def _kernel_shape(self, input_shape):
        return super()._kernel_shape(_as_one_capsule(input_shape))

    def build(self, input_shape):
        _RoutedCapsule.build(self, input_shape)
        self.input_spec = keras.InputSpec(ndim=4, axes={3: input_shape[3]})

    def call(self, inputs):
        capsules = super().call(tf.expand_dims(inputs, axis=3))
        if not self.flatten:
            return capsules
        _, height, width, num_capsules, atoms = capsules.shape
        by_type = tf.transpose(capsules, [0, 3, 1, 2, 4])
        return tf.reshape(by_type, [-1, num_capsules * height * width, atoms])

    def compute_output_shape(self, input_shape):
        self._check_input_shape(input_shape)
        shape = self._capsule_grid_shape(_as_one_capsule(input_shape))
        if not self.flatten:
            return shape
        batch, height, width, num_capsules, atoms = shape
        return (batch, num_capsules * height * width, atoms)

    def get_config(self):
        config = super().get_config()
        del config["num_routing"]
        config["flatten"] = self.flatten
        return config


def _as_one_capsule(input_shape) -> tuple:
    """[batch, h, w, channels] -> [batch, h, w, 1, channels]: one input capsule."""
    return (*input_shape[:3], 1, input_shape[3])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Length(keras.layers.Layer):
    """Capsule lengths, the class scores of a CapsNet: `[..., atoms]` -> `[...]`.

    Uses `ops.safe_norm`, finite gradient for a zero capsule.
    Input shape: `[batch, ..., atoms]`, rank 2 or more (a rank-1 input has no batch axis
    and would be reduced to one number).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.input_spec = keras.InputSpec(min_ndim=2)

    def call(self, inputs):
        return ops.safe_norm(inputs, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ReconstructionDecoder(keras.layers.Layer):
    """Masked reconstruction decoder (the reference's `reconstruction`, paper Fig. 2).

    All capsules but the target's are zeroed, the result is flattened
    (capsule-major) and decoded by three dense layers:
        relu(512) -> relu(1024) -> sigmoid(num_pixels).

    Args:
      num_pixels: height * width * depth of the reconstructed image.
      layer_sizes: the two hidden sizes, (512, 1024).

    Input: `[capsules, capsule_mask]` with capsules `[batch, num_capsules, atoms]`
      and capsule_mask `[batch, num_capsules]` (one-hot of the target).
    Output shape: `[batch, num_pixels]`, values in (0, 1).
    """

    def __init__(self, num_pixels: int, layer_sizes=(512, 1024), **kwargs):
        super().__init__(**kwargs)
        _check_positive(num_pixels=num_pixels)
        layer_sizes = tuple(layer_sizes)
        for size in layer_sizes:
            _check_positive(layer_size=size)
        self.num_pixels = num_pixels
        self.layer_sizes = layer_sizes
        units = (*layer_sizes, num_pixels)
        activations = ("relu",) * len(layer_sizes) + ("sigmoid",)
        # Attributes, not a list: tf.train.Checkpoint follows attributes but not the
        # lists Keras 3 wraps, and a list would leave the decoder out of checkpoints.
        for i, (size, activation) in enumerate(zip(units, activations, strict=True)):
            setattr(self, f"recons_{i + 1}", keras.layers.Dense(
                size,
                activation=activation,
                kernel_initializer=_reference_weight_initializer(),
                bias_initializer=_reference_bias_initializer(),
                dtype=self.dtype_policy,
                name=f"recons_{i + 1}",
            ))

    @property
    def dense_layers(self) -> list[keras.layers.Dense]:
        """The three dense layers recons_1..3, input to output."""
        return [getattr(self, f"recons_{i + 1}") for i in range(len(self.layer_sizes) + 1)]

    def _check_input_shape(self, input_shape):
        if (
            len(input_shape) != 2
            or len(input_shape[0]) != 3
            or len(input_shape[1]) != 2
            or input_shape[0][1] is None
            or input_shape[0][2] is None
            or input_shape[1][1] != input_shape[0][1]
        ):
            raise ValueError(
                f"{self.__class__.__name__} expects [capsules [batch, num_capsules, atoms], "
                f"capsule_mask [batch, num_capsules]], got shapes {input_shape}"
            )

    def build(self, input_shape):
        self._check_input_shape(input_shape)
        _, num_capsules, atoms = input_shape[0]
        size = num_capsules * atoms
        for layer in self.dense_layers:
            layer.build((None, size))
            size = layer.units

    def call(self, inputs):
        capsules, capsule_mask = inputs
        masked = capsules * tf.cast(capsule_mask, capsules.dtype)[:, :, None]
        hidden = tf.reshape(masked, [-1, capsules.shape[1] * capsules.shape[2]])
        for layer in self.dense_layers:
            hidden = layer(hidden)
        return hidden

    def compute_output_shape(self, input_shape):
        self._check_input_shape(input_shape)
        return (input_shape[0][0], self.num_pixels)

    def get_config(self):
        config = super().get_config()
        config.update(num_pixels=self.num_pixels, layer_sizes=list(self.layer_sizes))
        return config
