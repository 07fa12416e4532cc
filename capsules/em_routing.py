"""EM routing between matrix capsules ("Matrix capsules with EM routing", Hinton et al., 2018).

The paper's procedure 1, with the choices the paper leaves open taken from the
official code (google-research/google-research, capsule_em/em_layers.py):

  M-step, for parents j and pose components h, children i:
    r_ij = R_ij a_i,  m_j = sum_i r_ij,
    mu_jh = sum_i r_ij V_ijh / m_j,
    sigma2_jh = sum_i r_ij (V_ijh - mu_jh)^2 / m_j + 0.0005,
    cost_j = s m_j sum_h (c_v beta_v_j + ln sigma_jh),
    a_j = sigmoid(lambda_t (c_a beta_a_j - cost_j));
  E-step, in log space:
    R_ij = softmax over the parents j of the child i of
           ln a_j + ln N(V_ij; mu_j, sigma2_j) (a Gaussian with diagonal covariance).

R starts uniform over each child's parents; lambda_t = final_lambda (1 - 0.95^(t+1))
for t = 0..num_routing-1; the output is the last M-step's mu and a. s is 1 in
fully connected routing and output_dim in convolutional routing (`conv_em_routing`:
the cost in the official code's units of mass). Where the
official code departs from the paper (a damped mean, per-type normalisation in the
convolutional layers, ln sigma^2 in the cost) this module follows the paper;
docs/em_routing.md lists each departure and why.

Layout. Votes are routed as `[*groups, parents, children, 16]`: for every group
(batch; batch and output position for a convolution) the M-step's sums over the
children are matrix products [1, children] x [children, 16] of the routes with the
votes and with their squares (votes taken relative to their mean over the parent's
children, so that the sums keep float32 precision), and the E-step's squared
distances [V, V^2] . (-2 mu / sigma2, 1 / sigma2) one elementwise pass over the votes.
The convolutional E-step normalises each child over all parents that receive its votes
(all output types at all covering positions, any stride) with segment sums over
the flat child index of every (output position, kernel offset): tensors of 1/16 of
the votes' size per output type, no tiles. The gradient is written out
(`_route`): one elementwise pass forms the votes' gradient, instead of 2 num_routing - 1
votes-sized outer products that autodiff would add up. The iterations and their gradient
run XLA-compiled where the votes are large (`_Iterations`): XLA fuses the small
per-parent and per-route operations and each distance's products with its sum.
A convolutional layer on the CPU need not store its votes at all
(`conv_em_routing_of_patches`): `capsules.em_kernels` computes each vote P W where a
routed sum, a distance or the gradient uses it (benchmarks/README.md has the timings).
"""

from __future__ import annotations

import math

import tensorflow as tf

from capsules import em_kernels
from capsules.conv import conv_output_length, patch_indices

POSE_SIZE = 16
_LN_2PI = math.log(2.0 * math.pi)
# The official code adds min_var = 0.0005 to every variance: a parent fed by one
# child (or by identical votes) keeps a finite ln sigma and Gaussian density.
VARIANCE_FLOOR = 0.0005
# Added to each parent's mass so that a parent whose children are all inactive
# gets mu = 0 instead of 0 / 0 (the official code: 1e-7 in conv layers, 1e-5 in the
# class layer; a single value here, far below any real mass).
_MASS_EPSILON = 1e-7
# The official cost is m_j (sum_h ln sigma2_jh + 16 (1 + ln 2 pi) beta_v_j) and the
# logit lambda (-cost - 5000 beta_a). In the paper's terms (ln sigma, + beta_a) that is
# twice lambda (c_a beta_a - m_j sum_h (c_v beta_v_j + ln sigma_jh)) with these scales
# (and beta_a of the opposite sign): c_v (1 + ln 2 pi) / 2 makes beta_v the offset of
# each component's Gaussian entropy, c_a = 2500 lets beta_a reach the cost's magnitude
# (a mass of tens times 16 components) without saturating the activations.
BETA_V_SCALE = (1.0 + _LN_2PI) / 2.0
BETA_A_SCALE = 2500.0
# The official convolutional layers normalise each child's routes per output type (they
# sum to 1 over the covering positions of each type), ours over all parents (the paper),
# so the official masses are output_dim times ours from the uniform start on. Their cost
# counts mass in those units, which keeps its scale against c_a beta_a and lambda the
# official one (the same as lambda x output_dim with beta_a / output_dim): with the
# paper's masses the cost is about 1/32 of c_a beta_a at the official initial values, and
# every convolutional activation starts at sigmoid(lambda c_a beta_a) whatever the votes.


def inverse_temperatures(num_routing: int, final_lambda: float) -> list[float]:
    """lambda_t = final_lambda (1 - 0.95^(t+1)), t = 0..num_routing-1 (the official schedule)."""
    return [final_lambda * (1.0 - 0.95 ** (t + 1)) for t in range(num_routing)]


def _check_routing_args(num_routing: int, final_lambda: float,
                        variance_floor: float = VARIANCE_FLOOR, cost_scale: float = 1.0) -> None:
    if not isinstance(num_routing, int) or num_routing < 1:
        raise ValueError(f"num_routing must be a positive integer, got {num_routing!r}")
    if not final_lambda > 0:
        raise ValueError(f"final_lambda must be > 0, got {final_lambda!r}")
    if not variance_floor > 0:
        raise ValueError(f"variance_floor must be > 0, got {variance_floor!r}")
    if not cost_scale > 0:
        raise ValueError(f"cost_scale must be > 0, got {cost_scale!r}")


def em_routing(
    votes: tf.Tensor,
    activations: tf.Tensor,
    beta_v: tf.Tensor,
    beta_a: tf.Tensor,
    num_routing: int = 3,
    final_lambda: float = 0.01,
    variance_floor: float = VARIANCE_FLOOR,
    cost_scale: float = 1.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """EM routing, fully connected: every child votes for every parent.

    Args:
      votes: `[batch, input_dim, output_dim, 16]`, V_ij (4x4 poses read row-major).
      activations: `[batch, input_dim]`, the children's a_i.
      beta_v, beta_a: `[output_dim]`, one per output capsule type (see the module
        docstring for their scales).
      num_routing: EM iterations (M-steps), >= 1.
      final_lambda: the inverse temperature's final value.
      variance_floor: added to every variance (the official 0.0005).
      cost_scale: s of the module docstring, each parent's mass counted this many times
        in its cost (1: the paper).

    Returns:
      poses `[batch, output_dim, 16]` (mu of the last M-step) and activations
      `[batch, output_dim]` (its a_j).

    Example:
      >>> votes = tf.random.normal([8, 32, 10, 16])
      >>> poses, acts = em_routing(votes, tf.ones([8, 32]), tf.zeros([10]), tf.zeros([10]))
      >>> poses.shape, acts.shape
      (TensorShape([8, 10, 16]), TensorShape([8, 10]))
    """
    _check_routing_args(num_routing, final_lambda)
    votes = tf.convert_to_tensor(votes)
    if votes.shape.rank != 4 or votes.shape[-1] != POSE_SIZE:
        raise ValueError(f"votes must be [batch, input_dim, output_dim, 16], got {votes.shape}")
    activations = tf.convert_to_tensor(activations, votes.dtype)
    return route_dense(
        tf.transpose(votes, [0, 2, 1, 3]), activations[:, None, :], beta_v, beta_a,
        num_routing, final_lambda, variance_floor, cost_scale,
    )


def route_dense(votes, child_activations, beta_v, beta_a, num_routing, final_lambda,
                variance_floor=VARIANCE_FLOOR, cost_scale=1.0):
    """EM routing of votes already in the routing layout (no transpose).

    votes `[batch, output_dim, input_dim, 16]`, child_activations `[batch, 1, input_dim]`;
    the other arguments and the result as `em_routing`.
    """
    _check_routing_args(num_routing, final_lambda, variance_floor, cost_scale)
    return _route(
        (votes,), child_activations, _as_vector(beta_v, votes), _as_vector(beta_a, votes),
        inverse_temperatures(num_routing, final_lambda), grid=None,
        mass_scale=float(cost_scale), variance_floor=float(variance_floor),
    )


def conv_em_routing(
    votes: tf.Tensor,
    activations: tf.Tensor,
    beta_v: tf.Tensor,
    beta_a: tf.Tensor,
    kernel_size: int,
    strides: int,
    num_routing: int = 3,
    final_lambda: float = 0.01,
    variance_floor: float = VARIANCE_FLOOR,
    cost_scale: float = 1.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """EM routing of a "VALID" convolutional capsule layer.

    The child (row, col, type t) votes, through kernel offset (ky, kx), for every
    output type at each output position (oy, ox) with (oy s + ky, ox s + kx) =
    (row, col). Its assignment probabilities sum to 1 over all those parents (all
    output types at all covering positions), for any stride; border children have
    fewer parents and start with larger uniform shares. The cost counts each parent's
    mass times output_dim (s in the module docstring), in the official code's units.

    Args:
      votes: `[batch, out_height, out_width, output_dim, kernel_size^2 * input_dim, 16]`,
        the children of each output position in (ky, kx, t) order.
      activations: `[batch, height, width, input_dim]`, the children's a_i.
      beta_v, beta_a: `[output_dim]`, shared over positions.
      kernel_size, strides: of the convolution ("VALID").
      num_routing, final_lambda, variance_floor: as `em_routing`.
      cost_scale: multiplies the official units of mass in the cost (1: the official).

    Returns:
      poses `[batch, out_height, out_width, output_dim, 16]` and activations
      `[batch, out_height, out_width, output_dim]`.
    """
    _check_routing_args(num_routing, final_lambda, variance_floor, cost_scale)
    votes = tf.convert_to_tensor(votes)
    activations = tf.convert_to_tensor(activations, votes.dtype)
    _, height, width, input_dim = activations.shape
    _, out_height, out_width, output_dim, children, _ = votes.shape
    expected = _conv_children(activations, kernel_size, strides)
    if (out_height, out_width, children) != expected or votes.shape[-1] != POSE_SIZE:
        raise ValueError(
            f"votes of shape {votes.shape} do not fit activations of shape {activations.shape} "
            f"with kernel_size={kernel_size}, strides={strides}: expected [batch, {expected[0]}, "
            f"{expected[1]}, output_dim, {expected[2]}, 16]"
        )
    grid = ChildGrid(height, width, input_dim, kernel_size, strides)
    positions = out_height * out_width
    return _conv_route(
        (tf.reshape(votes, [-1, positions, output_dim, children, POSE_SIZE]),), _StoredVotes,
        activations, beta_v, beta_a, grid, (out_height, out_width, output_dim), num_routing,
        final_lambda, variance_floor, cost_scale,
    )


def conv_em_routing_of_patches(
    patches: tf.Tensor,
    kernel: tf.Tensor,
    activations: tf.Tensor,
    beta_v: tf.Tensor,
    beta_a: tf.Tensor,
    kernel_size: int,
    strides: int,
    num_routing: int = 3,
    final_lambda: float = 0.01,
    variance_floor: float = VARIANCE_FLOOR,
    cost_scale: float = 1.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`conv_em_routing` of the votes V = P W, computed where they are used on the CPU
    (`capsules.em_kernels`, where `em_kernels.available()`).

    Args:
      patches: `[batch, out_height, out_width, kernel_size^2 * input_dim, 16]`, the poses P
        of each output position's children in (ky, kx, t) order, float32.
      kernel: `[kernel_size^2 * input_dim, output_dim, 16]`, the 4x4 weights W, float32.
      Others: as `conv_em_routing`.

    Returns: as `conv_em_routing`, equal to it for votes P W to float32 round-off.
    """
    _check_routing_args(num_routing, final_lambda, variance_floor, cost_scale)
    _, height, width, input_dim = activations.shape
    expected = _conv_children(activations, kernel_size, strides)
    if (patches.shape.rank != 5 or tuple(patches.shape[1:]) != (*expected, POSE_SIZE)
            or kernel.shape.rank != 3 or kernel.shape[0] != expected[-1]
            or kernel.shape[-1] != POSE_SIZE):
        raise ValueError(
            f"patches of shape {patches.shape} and kernel of shape {kernel.shape} do not fit "
            f"activations of shape {activations.shape} with kernel_size={kernel_size}, "
            f"strides={strides}: expected [batch, {expected[0]}, {expected[1]}, {expected[2]}, "
            f"16] and [{expected[2]}, output_dim, 16]"
        )
    out_height, out_width, children = expected
    output_dim = kernel.shape[1]
    grid = ChildGrid(height, width, input_dim, kernel_size, strides)
    return _conv_route(
        (tf.reshape(patches, [-1, out_height * out_width, children, POSE_SIZE]), kernel),
        _ComputedVotes, activations, beta_v, beta_a, grid, (out_height, out_width, output_dim),
        num_routing, final_lambda, variance_floor, cost_scale,
    )


def _conv_children(activations, kernel_size: int, strides: int) -> tuple[int, int, int]:
    """(out_height, out_width, children per output position) of a "VALID" convolution of
    the [batch, height, width, input_dim] capsule grid of `activations`."""
    _, height, width, input_dim = activations.shape
    return (
        conv_output_length(height, kernel_size, strides, "VALID"),
        conv_output_length(width, kernel_size, strides, "VALID"),
        kernel_size * kernel_size * input_dim,
    )


def _conv_route(votes, votes_class, activations, beta_v, beta_a, grid, parents, num_routing,
                final_lambda, variance_floor, cost_scale):
    poses, parent_activations = _route(
        votes,
        grid.child_activations(activations),
        _as_vector(beta_v, votes[0]),
        _as_vector(beta_a, votes[0]),
        inverse_temperatures(num_routing, final_lambda),
        grid,
        # The official units of mass (see BETA_A_SCALE).
        mass_scale=float(parents[-1]) * cost_scale,
        variance_floor=float(variance_floor),
        votes_class=votes_class,
    )
    return (
        tf.reshape(poses, [-1, *parents, POSE_SIZE]),
        tf.reshape(parent_activations, [-1, *parents]),
    )


class ChildGrid:
    """Which child of a [height, width, input_dim] grid each vote of a "VALID" convolution reads.

    The children of output position p and kernel offset k are the input position
    `patch_indices(...)[p * k^2 + k]` (ordered as `capsules.conv.patch_indices`) and
    all input types; votes list them per output position as (k, t).
    """

    def __init__(self, height: int, width: int, input_dim: int, kernel_size: int, strides: int):
        self.args = (height, width, input_dim, kernel_size, strides)
        self.height, self.width, self.input_dim = height, width, input_dim
        self.kernel_area = kernel_size * kernel_size
        indices = patch_indices(height, width, kernel_size, strides)
        self.positions = len(indices) // self.kernel_area
        self.indices = tf.constant(indices)

    def gather(self, per_child: tf.Tensor) -> tf.Tensor:
        """`[batch, height * width, ...]` -> `[batch, positions * k^2, ...]`, per vote."""
        return tf.gather(per_child, self.indices, axis=1)

    def child_activations(self, activations: tf.Tensor) -> tf.Tensor:
        """`[batch, height, width, input_dim]` -> `[batch, positions, 1, k^2 * input_dim]`."""
        flat = tf.reshape(activations, [-1, self.height * self.width, self.input_dim])
        return tf.reshape(
            self.gather(flat), [-1, self.positions, 1, self.kernel_area * self.input_dim]
        )

    def scatter_sum(self, per_vote: tf.Tensor) -> tf.Tensor:
        """`[batch, positions * k^2, input_dim]` summed per child -> `[batch, h * w, input_dim]`."""
        return self._per_child(per_vote, tf.math.unsorted_segment_sum)

    def scatter_max(self, per_vote: tf.Tensor) -> tf.Tensor:
        """As `scatter_sum` with the maximum."""
        return self._per_child(per_vote, tf.math.unsorted_segment_max)

    def _per_child(self, per_vote, segment_op):
        batch = tf.shape(per_vote)[0]
        cells = self.height * self.width
        # One segment per (image, input position): ids [batch, positions * k^2].
        ids = self.indices[None, :] + cells * tf.range(batch)[:, None]
        reduced = segment_op(per_vote, ids, num_segments=batch * cells)
        return tf.reshape(reduced, [batch, cells, self.input_dim])

    def normalise(self, logits: tf.Tensor) -> tf.Tensor:
        """Softmax of logits `[batch, positions, output_dim, k^2 * input_dim]` over the
        parents of each child (all output types at all positions it reaches)."""
        shape = tf.shape(logits)
        per_vote = tf.reshape(
            logits, [shape[0], self.positions, shape[2], self.kernel_area, self.input_dim]
        )
        # The per-child maximum only keeps exp in range; it cancels, so no gradient.
        top = tf.reduce_max(per_vote, axis=2)  # [batch, positions, k^2, input_dim]
        top = tf.stop_gradient(self._back_to_votes(self.scatter_max(self._flat(top))))
        exp = tf.exp(per_vote - top[:, :, None])
        total = self._back_to_votes(self.scatter_sum(self._flat(tf.reduce_sum(exp, axis=2))))
        return tf.reshape(exp / total[:, :, None], shape)

    def _flat(self, per_vote):
        """[batch, positions, k^2, input_dim] -> [batch, positions * k^2, input_dim]."""
        return tf.reshape(per_vote, [-1, self.positions * self.kernel_area, self.input_dim])

    def _back_to_votes(self, per_child):
        """[batch, h * w, input_dim] -> [batch, positions, k^2, input_dim]."""
        return tf.reshape(
            self.gather(per_child), [-1, self.positions, self.kernel_area, self.input_dim]
        )


def _as_vector(beta, votes) -> tf.Tensor:
    return tf.reshape(tf.cast(beta, votes.dtype), [-1])


def _softmax_over_parents(logits: tf.Tensor) -> tf.Tensor:
    """Softmax of `[..., output_dim, input_dim]` over output_dim (written out, as ops.py's)."""
    exp = tf.exp(logits - tf.stop_gradient(tf.reduce_max(logits, axis=-2, keepdims=True)))
    return exp / tf.reduce_sum(exp, axis=-2, keepdims=True)


def _m_step(stats, weights, beta_v, beta_a, inverse_temperature, mass_scale, center,
            variance_floor):
    """Parents' (mu, sigma2, activation logit) from the routed sums of votes taken
    relative to `center`.

    stats `[..., C, 32]`: sum_i r_ij V'_ij and sum_i r_ij V'_ij^2 for V' = V - center;
    weights r `[..., C, N]`; mass_scale: s of the module docstring; center `[..., C, 16]`.
    Returns mu relative to center: the official sum_i r_ij V_ij / (m_j + epsilon), minus
    center, and the two-pass variance sum_i r_ij (V_ij - mu_j)^2 / (m_j + epsilon).
    """
    total = tf.reduce_sum(weights, axis=-1)[..., None]
    mass = total + _MASS_EPSILON
    sums, squares = stats[..., :POSE_SIZE], stats[..., POSE_SIZE:]
    mean = (sums - _MASS_EPSILON * center) / mass
    # sum_i r (V' - mu)^2 expanded; it can round below zero for near-identical votes.
    deviations = tf.nn.relu(squares - 2.0 * mean * sums + tf.square(mean) * total)
    variance = deviations / mass + variance_floor
    cost = mass_scale * mass[..., 0] * tf.reduce_sum(
        BETA_V_SCALE * beta_v[:, None] + 0.5 * tf.math.log(variance), axis=-1
    )
    return mean, variance, inverse_temperature * (BETA_A_SCALE * beta_a - cost)


def _e_step_terms(mean, variance, logit):
    """(w `[..., C, 32]`, bias `[..., C]`) such that
    ln a_j + ln N(V_ij; mu_j, sigma2_j) = bias_j - [V_ij, V_ij^2] . w_j / 2.

    The bias is summed in float64: its 16 ln sigma2_jh, about ln 0.0005 = -7.6 each near
    the official variance floor, add up to some hundred, whose float32 rounding enters every
    route to the parent (test_em_capsnet.py's float32 gradients)."""
    inverse = 1.0 / variance
    weights = tf.concat([-2.0 * mean * inverse, inverse], axis=-1)
    mean, variance, logit = (tf.cast(x, tf.float64) for x in (mean, variance, logit))
    bias = (
        tf.math.log_sigmoid(logit)
        - 0.5 * tf.reduce_sum(tf.math.log(variance) + tf.square(mean) / variance, axis=-1)
        - 0.5 * POSE_SIZE * _LN_2PI
    )
    return weights, tf.cast(bias, weights.dtype)


def _iteration_outputs(stats, weights, beta_v, beta_a, inverse_temperature, mass_scale, center,
                       variance_floor, last):
    """What an iteration hands on: (mu, a) after the last M-step, else the E-step's (w, bias),
    mu relative to center."""
    mean, variance, logit = _m_step(
        stats, weights, beta_v, beta_a, inverse_temperature, mass_scale, center, variance_floor
    )
    if last:
        return mean, tf.sigmoid(logit)
    return _e_step_terms(mean, variance, logit)


def _routed_sums(weights, votes, squares):
    """sum_n r_n [V_n, V_n^2] `[..., C, 32]` of weights `[..., C, N]`: two matrix products."""
    def product(matrix):
        return tf.squeeze(tf.matmul(weights[..., None, :], matrix), axis=-2)

    return tf.concat([product(votes), product(squares)], axis=-1)


def _distances(votes, weights):
    """[V_n, V_n^2] . w `[..., C, N]` for w `[..., C, 32]`, computed from V alone: one fused
    pass under XLA (matrix products would read both V and V^2)."""
    return tf.reduce_sum(
        votes * (weights[..., None, :POSE_SIZE] + votes * weights[..., None, POSE_SIZE:]), axis=-1
    )


def _route(
    votes: tuple,
    child_activations: tf.Tensor,
    beta_v: tf.Tensor,
    beta_a: tf.Tensor,
    inverse_temperatures: list[float],
    grid: ChildGrid | None,
    mass_scale: float = 1.0,
    variance_floor: float = VARIANCE_FLOOR,
    votes_class: type | None = None,
):
    """The EM iterations on votes `[*groups, C, N, 16]`, children's a `[*groups, 1, N]`.

    votes: the tensors `votes_class` makes the votes of: (votes,) for `_StoredVotes` (the
    default), (patches, kernel) for `_ComputedVotes`.
    grid: the convolution whose children are normalised over all their parents
    (`ChildGrid.normalise`), or None: each child's routes are a softmax over the C parents
    of its group. mass_scale: s of the module docstring; variance_floor: added to every
    variance. Returns mu `[*groups, C, 16]` and a `[*groups, C]`.

    The iterations and their gradient run as three functions, XLA-compiled for stored votes
    of at least _XLA_MIN_VOTES_PER_EXAMPLE elements per example (`_Iterations`).
    Gradient: no stop_gradient anywhere (as the official code), written out: the
    backward pass runs the iterations in reverse and differentiates only the small
    per-parent and per-route functions by autodiff; the votes-sized work is one routed sum
    per distance, one distance per routed sum and, at the end, one pass for the votes'
    gradient
        d[V, V^2] = sum_t r_t (x) g_t + sum_t d_t (x) w_t
    (r_t routed weights, g_t gradients of the M-step sums, w_t E-step weights, d_t
    gradients of the E-step distances). Equal to autodiff of the plain loop to round-off
    (tests/test_em_routing.py).
    """
    votes_class = votes_class or _StoredVotes
    iterations = _Iterations.of(tuple(inverse_temperatures), grid.args if grid else None,
                                float(mass_scale), float(variance_floor), votes_class,
                                votes_class.compiles(*votes))

    @tf.custom_gradient
    def route(*args):
        *votes, child_activations, beta_v, beta_a = args
        poses, activations, saved = iterations.forward(
            tuple(votes), child_activations, beta_v, beta_a
        )

        def grad(d_poses, d_activations):
            # An output the loss does not use may come back as None.
            d_poses = tf.zeros_like(poses) if d_poses is None else d_poses
            d_activations = tf.zeros_like(activations) if d_activations is None else d_activations
            lefts, rights, d_child, d_beta_v, d_beta_a = iterations.backward(
                saved, child_activations, beta_v, beta_a, d_poses, d_activations
            )
            d_votes = iterations.votes_gradient(saved["votes"], lefts, rights)
            return (*d_votes, d_child, d_beta_v, d_beta_a)

        return (poses, activations), grad

    return route(*votes, child_activations, beta_v, beta_a)


class _StoredVotes:
    """Votes `[*groups, C, N, 16]` held as a tensor: relative to their mean over each
    parent's children (`center`), with their squares. Its routed sums are matrix products,
    its distances one fused pass under XLA."""

    def __init__(self, votes, center, squares):
        self.votes, self.center, self.squares = votes, center, squares

    @staticmethod
    def compiles(votes) -> bool:
        return votes.shape[1:].num_elements() >= _XLA_MIN_VOTES_PER_EXAMPLE

    @classmethod
    def of(cls, votes):
        # The votes are routed relative to their plain mean over each parent's children:
        # the sums of V and V^2 lose float32 precision where a parent's votes sit close
        # together far from 0, and every M-step and E-step quantity is exact in any such
        # frame (_m_step carries the epsilon of the mass over). A constant: no gradient
        # flows through it.
        center = tf.reduce_mean(votes, axis=-2)  # [*groups, C, 16]
        votes = votes - center[..., None, :]
        return cls(votes, center, tf.square(votes))

    @property
    def state(self) -> tuple:
        return self.votes, self.center, self.squares

    def zero_routes(self):
        return tf.zeros_like(self.votes[..., 0])

    def sums(self, weights):
        return _routed_sums(weights, self.votes, self.squares)

    def distances(self, weights):
        return _distances(self.votes, weights)

    def gradient(self, lefts, rights) -> tuple:
        return (_votes_gradient(self.votes, lefts, rights),)


class _ComputedVotes:
    """The votes of a convolutional layer, V = P W relative to their mean over each
    parent's children, computed where they are used by `capsules.em_kernels`: patches
    `[batch, positions, N, 16]` (the poses of each output position's children), kernel
    `[N, C, 16]`; groups [batch, positions]."""

    def __init__(self, patches, kernel, center):
        self.patches, self.kernel, self.center = patches, kernel, center
        self._flat = tf.reshape(patches, [-1, *patches.shape[2:]])  # [G, N, 16]
        self._shape = tf.concat([tf.shape(patches)[:2], [kernel.shape[1]]], 0)  # groups, C

    @staticmethod
    def compiles(patches, kernel) -> bool:
        return False  # the kernels are TensorFlow ops that XLA cannot compile

    @classmethod
    def of(cls, patches, kernel):
        votes = cls(patches, kernel, None)
        votes.center = votes._grouped(_mean_vote(votes._flat, kernel))
        return votes

    @property
    def state(self) -> tuple:
        return self.patches, self.kernel, self.center

    def _grouped(self, flat):
        return tf.reshape(flat, tf.concat([self._shape, tf.shape(flat)[2:]], 0))

    def _groups(self, grouped):
        return tf.reshape(grouped, tf.concat([[-1], tf.shape(grouped)[2:]], 0))

    def zero_routes(self):
        return tf.zeros(tf.concat([self._shape, [self.kernel.shape[0]]], 0))

    def sums(self, weights):
        return self._grouped(em_kernels.vote_sums(
            self._flat, self.kernel, self._groups(self.center), self._groups(weights)))

    def distances(self, weights):
        return self._grouped(em_kernels.vote_distances(
            self._flat, self.kernel, self._groups(self.center), self._groups(weights)))

    def gradient(self, lefts, rights) -> tuple:
        d_patches, d_kernel = em_kernels.vote_gradient(
            self._flat, self.kernel, self._groups(self.center),
            tf.stack([self._groups(left) for left in lefts]),
            tf.stack([self._groups(right) for right in rights]),
        )
        return tf.reshape(d_patches, tf.shape(self.patches)), d_kernel


def _mean_vote(patches, kernel):
    """sum_n P_gn W_nc / N `[G, C, 16]` of patches `[G, N, 16]` and kernel `[N, C, 16]`: one
    matrix product [G x 4 rows, N x 4] x [N x 4, C x 4 cols], contracting the children with
    the inner index of the 4x4 product."""
    children, parents = kernel.shape[0], kernel.shape[1]
    rows = tf.transpose(tf.reshape(patches, [-1, children, 4, 4]), [0, 2, 1, 3])
    cols = tf.transpose(tf.reshape(kernel, [children, parents, 4, 4]), [0, 2, 1, 3])
    sums = tf.matmul(tf.reshape(rows, [-1, children * 4]),
                     tf.reshape(cols, [children * 4, parents * 4]))  # [G x 4, C x 4]
    mean = tf.transpose(tf.reshape(sums, [-1, 4, parents, 4]), [0, 2, 1, 3]) / children
    return tf.reshape(mean, [-1, parents, POSE_SIZE])


# The iterations are compiled with XLA where each example's votes have at least this many
# elements (the paper's small model on MNIST: 23,040 in the class layer, 460,800 in the
# first convolutional one). Compiling takes seconds per input shape and a training step then
# saves some 6 to 7 ns per vote element (benchmarks/README.md); smaller routings (tests, tiny
# models) run as TensorFlow ops. Per example, as the batch size is often unknown when traced.
_XLA_MIN_VOTES_PER_EXAMPLE = 2**14


class _Iterations:
    """The EM iterations of one routing configuration as three functions, XLA-compiled
    where `compiled` (else run as they are: eagerly, or inlined in the caller's graph).

    `forward` routes; `backward` runs the iterations' gradient back to the routes' weights
    (K = 2 num_routing - 1 pairs of per-route `lefts` and per-parent `rights`);
    `votes_gradient` forms d V from them in one pass. XLA fuses the small per-parent and
    per-route operations and each distance's products with its sum; the functions are
    separate so that the backward pass's per-route results reach the votes' gradient
    computed once, not recomputed in every element of it (XLA would fuse them in).
    One instance per configuration (`of`), so that each traces and compiles once per
    input shape, also when called eagerly.
    """

    _instances: dict = {}

    @classmethod
    def of(cls, inverse_temperatures: tuple, grid_args: tuple | None, mass_scale: float,
           variance_floor: float, votes_class: type, compiled: bool) -> _Iterations:
        key = (inverse_temperatures, grid_args, mass_scale, variance_floor, votes_class, compiled)
        if key not in cls._instances:
            cls._instances[key] = cls(*key)
        return cls._instances[key]

    def __init__(self, inverse_temperatures, grid_args, mass_scale, variance_floor, votes_class,
                 compiled):
        self.inverse_temperatures = inverse_temperatures
        self.votes_class = votes_class
        self.grid_args = grid_args
        self.mass_scale = mass_scale
        self.variance_floor = variance_floor
        def wrap(function):
            return tf.function(function, jit_compile=True, autograph=False) if compiled else (
                function)

        self.forward = wrap(self._forward)
        self.backward = wrap(self._backward)
        self.votes_gradient = wrap(self._votes_gradient)

    def _normalise(self):
        # Built while tracing: the grid's indices become constants of the traced function.
        return ChildGrid(*self.grid_args).normalise if self.grid_args else _softmax_over_parents

    def _outputs(self, t, stats, weights, beta_v, beta_a, center):
        return _iteration_outputs(
            stats, weights, beta_v, beta_a, self.inverse_temperatures[t], self.mass_scale,
            center, self.variance_floor, t == len(self.inverse_temperatures) - 1,
        )

    def _forward(self, votes, child_activations, beta_v, beta_a):
        """Returns mu, a and what the backward pass reads (the votes' state, and each
        iteration's routes, logits and routed sums)."""
        normalise = self._normalise()
        num_routing = len(self.inverse_temperatures)
        votes = self.votes_class.of(*votes)
        center = votes.center
        routes = [normalise(votes.zero_routes())]  # uniform over each child's parents
        logits, stats = [], []
        for t in range(num_routing):
            weights = routes[-1] * child_activations
            stats.append(votes.sums(weights))
            outputs = self._outputs(t, stats[-1], weights, beta_v, beta_a, center)
            if t == num_routing - 1:
                break
            e_weights, bias = outputs
            logits.append(bias[..., None] - 0.5 * votes.distances(e_weights))
            routes.append(normalise(logits[-1]))
        poses, activations = outputs
        saved = dict(votes=votes.state, routes=routes, logits=logits, stats=stats)
        return poses + center, activations, saved

    def _backward(self, saved, child_activations, beta_v, beta_a, d_poses, d_activations):
        """(lefts, rights, d child_activations, d beta_v, d beta_a); d[V, V^2] is
        sum_k lefts[k] (x) rights[k] (`_votes_gradient`)."""
        normalise = self._normalise()
        votes = self.votes_class(*saved["votes"])
        center = votes.center
        routes, logits, stats = saved["routes"], [None, *saved["logits"]], saved["stats"]
        lefts, rights = [], []
        d_child = tf.zeros_like(child_activations)
        d_beta_v, d_beta_a = tf.zeros_like(beta_v), tf.zeros_like(beta_a)
        upstream, d_logits = [d_poses, d_activations], None
        for t in reversed(range(len(self.inverse_temperatures))):
            last = t == len(self.inverse_temperatures) - 1
            weights = routes[t] * child_activations
            with tf.GradientTape() as tape:
                tape.watch([stats[t], weights, beta_v, beta_a])
                results = self._outputs(t, stats[t], weights, beta_v, beta_a, center)
            if not last:
                e_weights = results[0]
                # logits[t+1] = bias - distances / 2, distances = [V, V^2] . w
                d_distances = -0.5 * d_logits
                lefts.append(d_distances)
                rights.append(e_weights)
                upstream = [votes.sums(d_distances), tf.reduce_sum(d_logits, axis=-1)]
            d_stats, d_weights, d_bv, d_ba = tape.gradient(
                list(results), [stats[t], weights, beta_v, beta_a],
                output_gradients=upstream,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            d_beta_v += d_bv
            d_beta_a += d_ba
            lefts.append(weights)
            rights.append(d_stats)
            d_weights += votes.distances(d_stats)
            # weights = R_t * a (a broadcast over the parents)
            d_child += tf.reduce_sum(d_weights * routes[t], axis=-2, keepdims=True)
            if t > 0:
                with tf.GradientTape() as tape:
                    tape.watch(logits[t])
                    route = normalise(logits[t])
                d_logits = tape.gradient(
                    route, logits[t], output_gradients=d_weights * child_activations
                )
        return lefts, rights, d_child, d_beta_v, d_beta_a


    def _votes_gradient(self, state, lefts, rights):
        """The gradient of the tensors the votes are made of."""
        return self.votes_class(*state).gradient(lefts, rights)


def _votes_gradient(votes, lefts, rights):
    """d V `[..., C, N, 16]` = d[V, V^2] . (1, 2 V) for d[V, V^2] = sum_k lefts[k] (x) rights[k]
    (lefts `[..., C, N]`, rights `[..., C, 32]`): one elementwise pass under XLA."""
    return tf.add_n([
        left[..., None]
        * (right[..., None, :POSE_SIZE] + 2.0 * votes * right[..., None, POSE_SIZE:])
        for left, right in zip(lefts, rights, strict=True)
    ])
