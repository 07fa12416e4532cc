"""Capsule operations: safe norm, squash, routing by agreement and the margin loss.

Plain TensorFlow functions, numerically equal to the reference implementation
(Sarasra/models, research/capsules/models/layers/layers.py) except where a
comment says why they depart.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# Added under the square root so that the norm and its gradient stay finite at
# zero. The reference divides by a plain norm, which gives NaN for a zero
# capsule; for a capsule of norm >= 1e-3 the relative difference is below 1e-6.
_NORM_EPSILON = 1e-12


def safe_norm(x: tf.Tensor, axis: int = -1, keepdims: bool = False) -> tf.Tensor:
    """Euclidean norm along `axis`, sqrt(sum(x^2) + 1e-12): finite gradient at zero."""
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axis, keepdims=keepdims) + _NORM_EPSILON)


def squash(x: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """Squash non-linearity, eq. 1 of the paper: v = |s|^2 / (1 + |s|^2) * s / |s|.

    Written as s * |s| / (1 + |s|^2) with a safe norm, so that value and
    gradient are finite (zero) at s = 0, where the reference gives NaN.
    """
    norm = safe_norm(x, axis=axis, keepdims=True)
    return x * (norm / (1.0 + tf.square(norm)))


def _routing_softmax(logits: tf.Tensor, leaky: bool) -> tf.Tensor:
    """Softmax of routing logits `[..., output_dim, input_dim]` over the output capsules.

    Leaky routing (the reference's `_leaky_routing`) adds a zero logit in front,
    takes the softmax over output_dim + 1 and drops the extra row, so an input
    capsule that fits no output can send part of its vote nowhere.
    """
    if leaky:
        logits = tf.concat([tf.zeros_like(logits[..., :1, :]), logits], axis=-2)
    # exp / sum written out: tf.nn.softmax over a non-last axis transposes with a
    # permutation XLA cannot see as a constant inside the loop's gradient.
    exp = tf.exp(logits - tf.reduce_max(logits, axis=-2, keepdims=True))
    route = exp / tf.reduce_sum(exp, axis=-2, keepdims=True)
    return route[..., 1:, :] if leaky else route


_FC_VOTES = "[batch, input_dim, output_dim, output_atoms]"
_CONV_VOTES = "[batch, input_dim, output_dim, output_atoms, height, width]"


def update_routing(
    votes: tf.Tensor, biases: tf.Tensor, num_routing: int | tf.Tensor, leaky: bool = False
) -> tf.Tensor:
    """Routing by agreement (procedure 1 of the paper), the reference's `_update_routing`.

    In the reference's layouts:
      fully connected: votes `[batch, input_dim, output_dim, output_atoms]`,
        biases `[output_dim, output_atoms]`, returns `[batch, output_dim, output_atoms]`;
      convolutional: votes `[batch, input_dim, output_dim, output_atoms, height, width]`
        (what the reference's `_depthwise_conv3d` returns), biases `[output_dim, output_atoms]`
        or `[output_dim, output_atoms, 1, 1]` (shared over positions), returns
        `[batch, output_dim, output_atoms, height, width]`; routing is done independently
        at every position.

    Logits b `[batch, input_dim, output_dim, (height, width)]` start at zero. Each iteration:
        c = softmax(b) over output_dim (leaky: with an extra zero logit, dropped),
        s = sum over input_dim of c * votes + biases,
        v = squash(s) over output_atoms,
        b += <votes, v> over output_atoms.
    Returns the activation v of the last iteration. Differentiable through every
    iteration, as the reference (no stop_gradient). The iterations run in a
    `tf.while_loop` (swap_memory, as the reference), so `num_routing` may be a Python
    int or a scalar int tensor (>= 1).

    The package's layers call the same routing in their own layout (votes
    `[batch, (spatial...), output_dim, input_dim, output_atoms]`, where both sums are
    batched matmuls); this function transposes to it and back.

    Example:
        votes = tf.random.normal([32, 1152, 10, 16])    # [batch, input_dim, output_dim, atoms]
        capsules = update_routing(votes, tf.zeros([10, 16]), num_routing=3)  # [32, 10, 16]
    """
    votes = tf.convert_to_tensor(votes)
    biases = tf.convert_to_tensor(biases, votes.dtype)
    if votes.shape.rank == 4:
        layout, bias_layouts = _FC_VOTES, "[output_dim, output_atoms]"
        fits = biases.shape.rank == 2
    elif votes.shape.rank == 6:
        layout = _CONV_VOTES
        bias_layouts = "[output_dim, output_atoms] or [output_dim, output_atoms, 1, 1]"
        fits = biases.shape.rank == 2 or (
            biases.shape.rank == 4 and biases.shape[2:].is_compatible_with([1, 1])
        )
    else:
        raise ValueError(
            f"votes must be {_FC_VOTES} (fully connected) or {_CONV_VOTES} (convolutional), "
            f"got shape {votes.shape}"
        )
    if not (fits and biases.shape[:2].is_compatible_with(votes.shape[2:4])):
        raise ValueError(
            f"biases must be {bias_layouts} for votes {layout} of shape {votes.shape}, "
            f"got shape {biases.shape}"
        )
    if biases.shape.rank == 4:
        biases = biases[:, :, 0, 0]
    if votes.shape.rank == 4:
        return _update_routing_output_major(
            tf.transpose(votes, [0, 2, 1, 3]), biases, num_routing, leaky
        )
    activation = _update_routing_output_major(
        tf.transpose(votes, [0, 4, 5, 2, 1, 3]), biases, num_routing, leaky
    )  # [batch, height, width, output_dim, output_atoms]
    return tf.transpose(activation, [0, 3, 4, 1, 2])


def _update_routing_output_major(
    votes: tf.Tensor, biases: tf.Tensor, num_routing: int | tf.Tensor, leaky: bool = False
) -> tf.Tensor:
    """`update_routing` in the layers' layout, output capsules before input capsules.

    votes `[batch, (spatial...), output_dim, input_dim, output_atoms]` (any number of
    spatial axes), biases `[output_dim, output_atoms]`; returns
    `[batch, (spatial...), output_dim, output_atoms]`.

    The reference orders votes `[batch, input_dim, output_dim, atoms, ...]` and
    computes both sums by tiling and reduce_sum. Here input_dim sits next to the
    atoms, so that for every (batch, position, output capsule) the weighted sum is
    one matrix product `[1, input_dim] x [input_dim, atoms]` and the agreement one
    `[input_dim, atoms] x [atoms, 1]`: batched matmuls, no tiles or transposes.
    Same values (benchmarks/throughput.py times both).
    """
    votes = tf.convert_to_tensor(votes)
    if votes.shape.rank is not None and votes.shape.rank < 4:
        raise ValueError(
            "votes must be [batch, (spatial...), output_dim, input_dim, output_atoms], "
            f"got shape {votes.shape}"
        )
    num_routing = _checked_num_routing(num_routing)
    biases = tf.convert_to_tensor(biases, votes.dtype)
    if isinstance(num_routing, int) and num_routing == 1:
        # One iteration (the primary capsules): zero logits route the same share,
        # softmax(0) = 1/output_dim (1/(output_dim + 1) leaky), of every vote, so
        # s = share * sum_i votes + biases: no logits, routes or matmuls to form.
        output_dim = votes.shape[-3]
        if output_dim is None:
            output_dim = tf.shape(votes)[-3]
        share = 1.0 / tf.cast(output_dim + int(leaky), votes.dtype)
        return squash(tf.reduce_sum(votes, axis=-2) * share + biases, axis=-1)
    return _route(votes, biases, num_routing, leaky)


def _checked_num_routing(num_routing: int | tf.Tensor) -> int | tf.Tensor:
    """A Python int >= 1 as it is; a scalar int tensor, checked >= 1 when it runs."""
    if isinstance(num_routing, (int, np.integer)) and not isinstance(num_routing, bool):
        if num_routing < 1:
            raise ValueError(f"num_routing must be >= 1, got {num_routing}")
        return int(num_routing)
    tensor = tf.convert_to_tensor(num_routing)
    if not tensor.dtype.is_integer or tensor.shape.rank != 0:
        raise ValueError(
            f"num_routing must be a Python int or a scalar int tensor, got {num_routing!r}"
        )
    static = tf.get_static_value(tensor)
    if static is not None and static < 1:
        raise ValueError(f"num_routing must be >= 1, got {static}")
    check = tf.debugging.assert_positive(tensor, message="num_routing must be >= 1")
    with tf.control_dependencies([check]):
        return tf.cast(tensor, tf.int32)


def _vector_jacobian(fn, x: tf.Tensor, upstream: tf.Tensor) -> tf.Tensor:
    """upstream^T d fn(x) / dx, by autodiff of the (small, elementwise-sized) `fn`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.gradient(y, x, output_gradients=upstream)


def _routing_softmax_gradient(route: tf.Tensor, d_route: tf.Tensor) -> tf.Tensor:
    """Gradient of the routing logits from that of the routes, c * (g - sum_j c_j g_j).

    Also right for leaky routes: the dropped leak row has no upstream gradient, so
    its term in the sum is zero.
    """
    return route * (d_route - tf.reduce_sum(route * d_route, axis=-2, keepdims=True))


def _move_first_axis_before_last(x: tf.Tensor) -> tf.Tensor:
    """`[k, ..., m, n]` -> `[..., m, k, n]`."""
    rank = x.shape.rank
    return tf.transpose(x, [*range(1, rank - 1), 0, rank - 1])


def _route(
    votes: tf.Tensor, biases: tf.Tensor, num_routing: int | tf.Tensor, leaky: bool
) -> tf.Tensor:
    """`num_routing` iterations of routing in a `tf.while_loop`, with their gradient written out.

    Autodiff of the iterations would form, for each weighted sum and each
    agreement, an outer product of the size of the votes and then add them up
    (2 * num_routing - 1 tensors of the votes' size). Here the backward pass
    runs the iterations in reverse, in a `tf.while_loop` too, keeping the
    votes-sized work to one contraction per sum or agreement (none for the first
    iteration's constant logits) and a single matrix product for the votes' gradient:
        d_votes = [c_n .. c_1, G_n .. G_2] x [ds_n .. ds_1, v_n-1 .. v_1]
    (c_r routes, ds_r gradients of the pre-activations s_r, v_r activations,
    G_r the gradient of the logits of iteration r), its 2 * num_routing - 1 terms
    kept in TensorArrays. The forward pass keeps each iteration's routes and
    pre-activations (of the size of the logits and of the output) in TensorArrays.
    The squash's own gradient, on small tensors, comes from autodiff. Equal to
    autodiff of the plain loop to float32 round-off (tests/test_ops.py, test_fast_paths.py).

    The loop runs the first num_routing - 1 iterations, each ending with its
    agreement; the last iteration's weighted sum and squash follow it, as its
    agreement would never be read (the reference computes it).
    """

    @tf.custom_gradient
    def iterate(votes, biases):
        def weighted_sum(logits):
            route = _routing_softmax(logits, leaky)
            return route, tf.squeeze(tf.matmul(route[..., None, :], votes), axis=-2) + biases

        def forward(i, logits, routes, preactivations):
            route, preactivation = weighted_sum(logits)
            activation = squash(preactivation, axis=-1)
            # Agreement <u_hat_j|i, v_j> of every input capsule i with output capsule j.
            agreement = tf.squeeze(tf.matmul(votes, activation[..., None]), axis=-1)
            return (i + 1, logits + agreement, routes.write(i, route),
                    preactivations.write(i, preactivation))

        def tensor_array(size, element_shape):
            return tf.TensorArray(votes.dtype, size=size, element_shape=element_shape,
                                  clear_after_read=False)

        logits = tf.zeros_like(votes[..., 0])  # [..., output_dim, input_dim]
        output_shape = votes.shape[:-2].concatenate(votes.shape[-1:])
        _, logits, routes, preactivations = tf.while_loop(
            lambda i, *_: i < num_routing - 1,
            forward,
            (tf.constant(0), logits, tensor_array(num_routing, logits.shape),
             tensor_array(num_routing, output_shape)),
            swap_memory=True,
        )
        route, preactivation = weighted_sum(logits)
        routes = routes.write(num_routing - 1, route)
        preactivations = preactivations.write(num_routing - 1, preactivation)
        for written in (routes, preactivations):
            # Read by the gradient only. Eager writes return a wrapper that logs "Object
            # was never used" when no gradient is taken; graph ones are plain TensorArrays.
            getattr(written, "mark_used", lambda: None)()

        def grad(d_activation):
            def backward(iteration, d_activation, d_logits, d_biases, lefts, rights):
                d_pre = _vector_jacobian(squash, preactivations.read(iteration), d_activation)
                route = routes.read(iteration)
                d_route = tf.squeeze(tf.matmul(votes, d_pre[..., None]), axis=-1)
                d_logits += _routing_softmax_gradient(route, d_route)
                # logits[iteration] = logits[iteration - 1] + <votes, v_(iteration - 1)>
                term = 2 * (num_routing - 1 - iteration)
                lefts = lefts.write(term, route).write(term + 1, d_logits)
                previous = squash(preactivations.read(iteration - 1), axis=-1)
                rights = rights.write(term, d_pre).write(term + 1, previous)
                d_activation = tf.squeeze(tf.matmul(d_logits[..., None, :], votes), axis=-2)
                return iteration - 1, d_activation, d_logits, d_biases + d_pre, lefts, rights

            # The first iteration (index 0) has constant zero logits: only its weighted sum.
            num_terms = 2 * num_routing - 1
            _, d_activation, _, d_biases, lefts, rights = tf.while_loop(
                lambda iteration, *_: iteration > 0,
                backward,
                (tf.convert_to_tensor(num_routing - 1), d_activation, tf.zeros_like(logits),
                 tf.zeros_like(d_activation), tensor_array(num_terms, logits.shape),
                 tensor_array(num_terms, output_shape)),
                swap_memory=True,
            )
            d_pre = _vector_jacobian(squash, preactivations.read(0), d_activation)
            lefts = lefts.write(num_terms - 1, routes.read(0)).stack()
            rights = rights.write(num_terms - 1, d_pre).stack()
            d_votes = tf.matmul(_move_first_axis_before_last(lefts),
                                _move_first_axis_before_last(rights), transpose_a=True)
            d_biases += d_pre
            d_biases = tf.reduce_sum(d_biases, axis=list(range(d_biases.shape.rank - 2)))
            return d_votes, tf.reshape(d_biases, tf.shape(biases))

        return squash(preactivation, axis=-1), grad

    return iterate(votes, biases)


def margin_loss(
    labels: tf.Tensor, raw_logits: tf.Tensor, margin: float = 0.4, downweight: float = 0.5
) -> tf.Tensor:
    """Per-class margin costs `[batch, num_classes]`, as the reference's `_margin_loss`.

    With l = raw_logits - 0.5 (capsule lengths moved to [-0.5, 0.5]):
        cost = 0.5 * T * max(0, margin - l)^2 + downweight * 0.5 * (1 - T) * max(0, l + margin)^2
    i.e. the paper's eq. 4 (m+ = 0.9, m- = 0.1, lambda = 0.5) times 0.5.
    labels: `[batch, num_classes]` one-hot or k-hot; raw_logits: capsule lengths, same shape.
    """
    labels = tf.cast(labels, raw_logits.dtype)
    logits = raw_logits - 0.5
    positive_cost = labels * tf.square(tf.nn.relu(margin - logits))
    negative_cost = (1.0 - labels) * tf.square(tf.nn.relu(logits + margin))
    return 0.5 * positive_cost + downweight * 0.5 * negative_cost
from capsules.em_routing import conv_em_routing, em_routing  # noqa: E402, F401
