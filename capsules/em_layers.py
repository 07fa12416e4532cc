"""Keras 3 matrix capsule layers with EM routing ("Matrix capsules with EM routing", 2018).

A matrix capsule layer takes and returns a pair (poses, activations):
poses `[batch, height, width, types, 4, 4]` and activations `[batch, height, width,
types]`; the class layer returns `[batch, classes, 4, 4]` and `[batch, classes]`.
Votes are pose x transformation, V_ij = M_i W_ij (the pose on the left, as the
official code's `matmul` of pose rows with the weights), and are routed by
`capsules.em_routing`. Initial values are the official code's
(google-research/google-research, capsule_em), with beta_a's sign flipped to the
paper's convention (see capsules/em_routing.py).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from capsules import em_kernels, em_routing
from capsules.conv import conv_output_length
from capsules.layers import _check_positive

_PACKAGE = "capsules"
_POSE = (4, 4)


def _initializer(value, default: keras.initializers.Initializer):
    return default if value == "official" else keras.initializers.get(value)


def _check_positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a number > 0, got {name}={value!r}")
    return float(value)


def _check_capsule_pair(layer, input_shape) -> tuple:
    """(poses shape, activations shape) of a [poses, activations] input, checked."""
    if (
        not isinstance(input_shape, (list, tuple))
        or len(input_shape) != 2
        or not isinstance(input_shape[0], (list, tuple))
    ):
        raise ValueError(
            f"{layer.__class__.__name__} expects [poses, activations], got {input_shape}"
        )
    poses, activations = (tuple(shape) for shape in input_shape)
    if (
        len(poses) != 6
        or poses[4:] != _POSE
        or any(d is None for d in poses[1:4])
        or activations[1:] != poses[1:4]
    ):
        raise ValueError(
            f"{layer.__class__.__name__} expects poses [batch, height, width, types, 4, 4] and "
            f"activations [batch, height, width, types] with known height, width and types, "
            f"got {poses} and {activations}"
        )
    return poses, activations


class _RoutedMatrixCapsule(keras.layers.Layer):
    """Base of the routed matrix capsule layers: weights, betas, routing arguments, config.

    Subclasses give the kernel shape and `_route`. The votes are computed in the
    compute dtype; under a mixed policy the routing runs in the float32 variable dtype.
    """

    # The official code's initial values (conv layers: original path).
    _KERNEL_STDDEV = 0.3
    _BETA_A = -0.5
    _BETA_V = 0.5

    def __init__(
        self,
        num_capsules: int,
        num_routing: int = 3,
        final_lambda: float = 0.01,
        kernel_initializer="official",
        beta_a_initializer="official",
        beta_v_initializer="official",
        variance_floor: float = em_routing.VARIANCE_FLOOR,
        cost_scale: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive(num_capsules=num_capsules, num_routing=num_routing)
        self.num_capsules = num_capsules
        self.num_routing = num_routing
        self.final_lambda = _check_positive_number("final_lambda", final_lambda)
        self.variance_floor = _check_positive_number("variance_floor", variance_floor)
        self.cost_scale = _check_positive_number("cost_scale", cost_scale)
        self.kernel_initializer = _initializer(
            kernel_initializer, keras.initializers.TruncatedNormal(stddev=self._KERNEL_STDDEV)
        )
        self.beta_a_initializer = _initializer(
            beta_a_initializer, keras.initializers.Constant(self._BETA_A)
        )
        self.beta_v_initializer = _initializer(
            beta_v_initializer, keras.initializers.Constant(self._BETA_V)
        )

    def _kernel_shape(self, input_types: int) -> tuple[int, ...]:
        raise NotImplementedError

    def build(self, input_shape):
        poses, _ = _check_capsule_pair(self, input_shape)
        self.kernel = self.add_weight(
            name="kernel", shape=self._kernel_shape(poses[3]), initializer=self.kernel_initializer
        )
        # Not autocast: the routing runs in the variable dtype.
        self.beta_a = self.add_weight(
            name="beta_a", shape=(self.num_capsules,), initializer=self.beta_a_initializer,
            autocast=False,
        )
        self.beta_v = self.add_weight(
            name="beta_v", shape=(self.num_capsules,), initializer=self.beta_v_initializer,
            autocast=False,
        )

    def compute_output_spec(self, inputs):
        # Routed in the variable dtype (float32 under a mixed policy), not in the compute
        # dtype Keras would assume.
        shapes = self.compute_output_shape([tuple(x.shape) for x in inputs])
        return tuple(keras.KerasTensor(shape, dtype=self.variable_dtype) for shape in shapes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_capsules=self.num_capsules,
            num_routing=self.num_routing,
            final_lambda=self.final_lambda,
            variance_floor=self.variance_floor,
            cost_scale=self.cost_scale,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            beta_a_initializer=keras.initializers.serialize(self.beta_a_initializer),
            beta_v_initializer=keras.initializers.serialize(self.beta_v_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PrimaryMatrixCapsule(keras.layers.Layer):
    """Primary matrix capsules: a 1x1 convolution to 4x4 poses and sigmoid activations.

        M(x, y) = reshape(W_pose^T u(x, y), [types, 4, 4]),
        a(x, y) = sigmoid(W_act^T u(x, y) - 1)
    with no bias (the official `primary_caps`: the 1x1 convolution has none, and the
    activation logits are offset by -1).

    Args:
      num_capsules: capsule types (B; 32 in the paper).
      pose_initializer, activation_initializer: default "official" (truncated
        normal, stddev 0.5 and 3.0).

    Weights: pose_kernel `[channels, num_capsules * 16]` (capsule-major),
      activation_kernel `[channels, num_capsules]`.
    Input shape: `[batch, height, width, channels]`.
    Output: poses `[batch, height, width, num_capsules, 4, 4]`, activations
      `[batch, height, width, num_capsules]`.

    Example:
      >>> poses, acts = PrimaryMatrixCapsule(32)(tf.zeros([2, 12, 12, 32]))
      >>> poses.shape, acts.shape
      (TensorShape([2, 12, 12, 32, 4, 4]), TensorShape([2, 12, 12, 32]))
    """

    _ACTIVATION_OFFSET = -1.0

    def __init__(self, num_capsules: int, pose_initializer="official",
                 activation_initializer="official", **kwargs):
        super().__init__(**kwargs)
        _check_positive(num_capsules=num_capsules)
        self.num_capsules = num_capsules
        self.pose_initializer = _initializer(
            pose_initializer, keras.initializers.TruncatedNormal(stddev=0.5)
        )
        self.activation_initializer = _initializer(
            activation_initializer, keras.initializers.TruncatedNormal(stddev=3.0)
        )

    def _check_input_shape(self, input_shape):
        if len(input_shape) != 4 or any(d is None for d in input_shape[1:]):
            raise ValueError(
                f"{self.__class__.__name__} expects input [batch, height, width, channels] "
                f"with known height, width and channels, got shape {tuple(input_shape)}"
            )

    def build(self, input_shape):
        self._check_input_shape(input_shape)
        channels = input_shape[3]
        self.pose_kernel = self.add_weight(
            name="pose_kernel", shape=(channels, self.num_capsules * 16),
            initializer=self.pose_initializer,
        )
        self.activation_kernel = self.add_weight(
            name="activation_kernel", shape=(channels, self.num_capsules),
            initializer=self.activation_initializer,
        )
        self.input_spec = keras.InputSpec(ndim=4, axes={3: channels})

    def call(self, inputs):
        _, height, width, _ = inputs.shape
        poses = tf.tensordot(inputs, self.pose_kernel, 1)
        logits = tf.tensordot(inputs, self.activation_kernel, 1) + self._ACTIVATION_OFFSET
        poses = tf.reshape(poses, [-1, height, width, self.num_capsules, *_POSE])
        return poses, tf.sigmoid(logits)

    def compute_output_shape(self, input_shape):
        self._check_input_shape(input_shape)
        grid = (*tuple(input_shape[:3]), self.num_capsules)
        return (*grid, *_POSE), grid

    def get_config(self):
        config = super().get_config()
        config.update(
            num_capsules=self.num_capsules,
            pose_initializer=keras.initializers.serialize(self.pose_initializer),
            activation_initializer=keras.initializers.serialize(self.activation_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvMatrixCapsule(_RoutedMatrixCapsule):
    """Convolutional matrix capsules with EM routing ("VALID" convolution).

    Each child, input type t at (row, col), votes through kernel offset (ky, kx) for
    every output type c at the output position whose receptive field holds it:
        V = M_t(row, col) W[ky, kx, t, c],
    and `em_routing.conv_em_routing` turns the votes into the parents' poses and
    activations, each child's assignments summing to 1 over all those parents. On a CPU
    the votes are not stored: `capsules.em_kernels` computes each where the routing uses
    it (`em_routing.conv_em_routing_of_patches`; the same results to float32 round-off).

    Args:
      num_capsules: output capsule types.
      kernel_size, strides: of the convolution (the paper: 3 and 2, then 3 and 1).
      num_routing: EM iterations (3).
      final_lambda: the inverse temperature's final value (0.01, the official).
      kernel_initializer, beta_a_initializer, beta_v_initializer: default "official"
        (truncated normal stddev 0.3; beta_a -0.5, beta_v 0.5).
      variance_floor: added to every variance in the routing (the official 0.0005).
      cost_scale: each parent's mass counts cost_scale times in its cost (1: the official
        units, see `em_routing.conv_em_routing`).

    Weights: kernel `[kernel_size, kernel_size, input_types, num_capsules, 4, 4]`,
      beta_a and beta_v `[num_capsules]` (shared over positions).
    Input: [poses `[batch, height, width, input_types, 4, 4]`, activations
      `[batch, height, width, input_types]`].
    Output: poses `[batch, out_height, out_width, num_capsules, 4, 4]`, activations
      `[batch, out_height, out_width, num_capsules]`.

    Example:
      >>> layer = ConvMatrixCapsule(16, kernel_size=3, strides=2)
      >>> poses, acts = layer([tf.zeros([2, 12, 12, 16, 4, 4]), tf.zeros([2, 12, 12, 16])])
      >>> poses.shape, acts.shape
      (TensorShape([2, 5, 5, 16, 4, 4]), TensorShape([2, 5, 5, 16]))
    """

    def __init__(self, num_capsules: int, kernel_size: int = 3, strides: int = 1,
                 num_routing: int = 3, final_lambda: float = 0.01, **kwargs):
        super().__init__(num_capsules, num_routing, final_lambda, **kwargs)
        _check_positive(kernel_size=kernel_size, strides=strides)
        self.kernel_size = kernel_size
        self.strides = strides

    def _kernel_shape(self, input_types):
        return (self.kernel_size, self.kernel_size, input_types, self.num_capsules, *_POSE)

    def build(self, input_shape):
        poses, _ = _check_capsule_pair(self, input_shape)
        self._output_grid(poses)  # the kernel must fit
        super().build(input_shape)

    def _output_grid(self, poses_shape) -> tuple[int, int]:
        out_height, out_width = (
            conv_output_length(length, self.kernel_size, self.strides, "VALID")
            for length in poses_shape[1:3]
        )
        if out_height < 1 or out_width < 1:
            raise ValueError(
                f"{self.__class__.__name__}: kernel_size={self.kernel_size} does not fit the "
                f"{poses_shape[1]}x{poses_shape[2]} input capsule grid"
            )
        return out_height, out_width

    def votes(self, poses: tf.Tensor) -> tf.Tensor:
        """Votes `[batch, out_height, out_width, num_capsules, k^2 * input_types, 16]`.

        The k x k patches of poses are gathered (`em_routing.ChildGrid`), then one
        product per (kernel offset, input type) of the patches' poses with its
        `[4, 4 * num_capsules]` weights; the result is laid out for the routing.
        """
        out_height, out_width = self._output_grid(poses.shape)
        children = self.kernel_size * self.kernel_size * poses.shape[3]
        patches = self.patches(poses)
        # [batch * positions, children, 4, 4] -> [children, batch * positions * 4, 4]
        rows = tf.transpose(tf.reshape(patches, [-1, children, 4, 4]), [1, 0, 2, 3])
        rows = tf.reshape(rows, [children, -1, 4])
        kernel = tf.reshape(self.kernel, [children, self.num_capsules, 4, 4])
        kernel = tf.reshape(tf.transpose(kernel, [0, 2, 1, 3]), [children, 4, -1])
        votes = tf.matmul(rows, kernel)  # [children, batch * positions * 4 rows, C * 4 cols]
        votes = tf.reshape(votes, [children, -1, out_height, out_width, 4, self.num_capsules, 4])
        votes = tf.transpose(votes, [1, 2, 3, 5, 0, 4, 6])
        return tf.reshape(votes, [-1, out_height, out_width, self.num_capsules, children, 16])

    def patches(self, poses: tf.Tensor) -> tf.Tensor:
        """The poses of each output position's children, `[batch, out_height, out_width,
        k^2 * input_types, 16]` in (ky, kx, t) order."""
        _, height, width, input_types, _, _ = poses.shape
        grid = em_routing.ChildGrid(height, width, input_types, self.kernel_size, self.strides)
        patches = grid.gather(tf.reshape(poses, [-1, height * width, input_types, 16]))
        return tf.reshape(patches, [-1, *self._output_grid(poses.shape),
                                    self.kernel_size**2 * input_types, 16])

    def call(self, inputs):
        poses, activations = inputs
        dtype = self.variable_dtype
        activations = tf.cast(activations, dtype)
        routing = (self.beta_v, self.beta_a, self.kernel_size, self.strides, self.num_routing,
                   self.final_lambda, self.variance_floor, self.cost_scale)
        if dtype == "float32" and em_kernels.available():
            # The votes computed where the routing uses them: no votes-sized tensor.
            out_poses, out_activations = em_routing.conv_em_routing_of_patches(
                tf.cast(self.patches(poses), dtype),
                tf.reshape(tf.cast(self.kernel, dtype), [-1, self.num_capsules, 16]),
                activations, *routing,
            )
        else:
            out_poses, out_activations = em_routing.conv_em_routing(
                tf.cast(self.votes(poses), dtype), activations, *routing
            )
        return tf.reshape(out_poses, [-1, *out_poses.shape[1:-1], *_POSE]), out_activations

    def compute_output_shape(self, input_shape):
        poses, _ = _check_capsule_pair(self, input_shape)
        grid = (poses[0], *self._output_grid(poses), self.num_capsules)
        return (*grid, *_POSE), grid

    def get_config(self):
        config = super().get_config()
        config.update(kernel_size=self.kernel_size, strides=self.strides)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ClassMatrixCapsule(_RoutedMatrixCapsule):
    """Class capsules: every capsule of the grid votes for every class, EM routing.

    One transformation per (input type, class), shared over positions:
        V = M_t(row, col) W[t, c] (+ coordinate addition),
    routed by `em_routing.route_dense` over all grid capsules. With
    coordinate_addition, the scaled centre of the voter's position, ((row + 0.5) /
    height, (col + 0.5) / width), is added to the first two elements of the vote's
    right-hand column, V[0, 3] and V[1, 3], as the paper says (the official code adds
    its own scaled coordinates to V[0, 0] and V[0, 1]).

    Args:
      num_classes: class capsules.
      num_routing, final_lambda: as `ConvMatrixCapsule` (the official class layer
        uses a quarter of the conv layers' final_lambda).
      coordinate_addition: add the voters' positions to their votes.
      variance_floor, cost_scale: as `ConvMatrixCapsule` (cost_scale 1: the paper's and
        the official class layer's masses; IBM's port multiplies them by 100 / (children /
        classes), see docs/em_routing.md).
      kernel_initializer, beta_a_initializer, beta_v_initializer: default "official"
        (truncated normal stddev 0.01; beta_a -1, beta_v 2).

    Weights: kernel `[input_types, num_classes, 4, 4]`, beta_a and beta_v `[num_classes]`.
    Input: [poses `[batch, height, width, input_types, 4, 4]`, activations
      `[batch, height, width, input_types]`].
    Output: poses `[batch, num_classes, 4, 4]`, activations `[batch, num_classes]`.

    Example:
      >>> layer = ClassMatrixCapsule(10)
      >>> poses, acts = layer([tf.zeros([2, 3, 3, 32, 4, 4]), tf.zeros([2, 3, 3, 32])])
      >>> poses.shape, acts.shape
      (TensorShape([2, 10, 4, 4]), TensorShape([2, 10]))
    """

    _KERNEL_STDDEV = 0.01
    _BETA_A = -1.0
    _BETA_V = 2.0

    def __init__(self, num_classes: int, num_routing: int = 3, coordinate_addition: bool = True,
                 final_lambda: float = 0.01, **kwargs):
        super().__init__(num_classes, num_routing, final_lambda, **kwargs)
        self.coordinate_addition = bool(coordinate_addition)

    @property
    def num_classes(self) -> int:
        return self.num_capsules

    def _kernel_shape(self, input_types):
        return (input_types, self.num_capsules, *_POSE)

    def votes(self, poses: tf.Tensor) -> tf.Tensor:
        """Votes `[batch, num_classes, height * width * input_types, 16]` (routing layout)."""
        _, height, width, input_types, _, _ = poses.shape
        # [input_types, batch * positions * 4 rows, 4] x [input_types, 4, classes * 4]
        rows = tf.reshape(
            tf.transpose(tf.reshape(poses, [-1, input_types, 4, 4]), [1, 0, 2, 3]),
            [input_types, -1, 4],
        )
        kernel = tf.reshape(
            tf.transpose(self.kernel, [0, 2, 1, 3]), [input_types, 4, self.num_capsules * 4]
        )
        votes = tf.reshape(
            tf.matmul(rows, kernel), [input_types, -1, height * width, 4, self.num_capsules, 4]
        )
        votes = tf.transpose(votes, [1, 4, 2, 0, 3, 5])  # [b, class, position, type, 4, 4]
        if self.coordinate_addition:
            votes += tf.cast(_coordinate_offsets(height, width), votes.dtype)[:, None]
        return tf.reshape(votes, [-1, self.num_capsules, height * width * input_types, 16])

    def call(self, inputs):
        poses, activations = inputs
        votes = tf.cast(self.votes(poses), self.variable_dtype)
        child_activations = tf.reshape(
            tf.cast(activations, self.variable_dtype), [-1, 1, votes.shape[2]]
        )
        out_poses, out_activations = em_routing.route_dense(
            votes, child_activations, self.beta_v, self.beta_a, self.num_routing,
            self.final_lambda, self.variance_floor, self.cost_scale,
        )
        return tf.reshape(out_poses, [-1, self.num_capsules, *_POSE]), out_activations

    def compute_output_shape(self, input_shape):
        poses, _ = _check_capsule_pair(self, input_shape)
        return (poses[0], self.num_capsules, *_POSE), (poses[0], self.num_capsules)

    def get_config(self):
        config = super().get_config()
        config["num_classes"] = config.pop("num_capsules")
        config["coordinate_addition"] = self.coordinate_addition
        return config


def _coordinate_offsets(height: int, width: int) -> np.ndarray:
    """`[height * width, 4, 4]`: the scaled centre (row, col) at pose elements [0, 3] and [1, 3]."""
    offsets = np.zeros((height, width, 4, 4), np.float32)
    offsets[:, :, 0, 3] = ((np.arange(height) + 0.5) / height)[:, None]
    offsets[:, :, 1, 3] = ((np.arange(width) + 0.5) / width)[None, :]
    return offsets.reshape(height * width, 4, 4)
