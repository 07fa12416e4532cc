"""Capsule operations: safe norm, squash, routing by agreement and the margin loss.

Plain TensorFlow functions, numerically equal to the reference implementation
(Sarasra/models, research/capsules/models/layers/layers.py) except where a
comment says why they depart.
"""

from __future__ import annotations

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


def update_routing(
    votes: tf.Tensor, biases: tf.Tensor, num_routing: int, leaky: bool = False
) -> tf.Tensor:
    """Routing by agreement (procedure 1 of the paper, the reference's `_update_routing`).

    Fully connected form:
        votes  `[batch, output_dim, input_dim, output_atoms]`,
        biases `[output_dim, output_atoms]`,
        returns `[batch, output_dim, output_atoms]`.
    Convolutional form: votes carry spatial axes after batch,
        votes  `[batch, height, width, output_dim, input_dim, output_atoms]`,
        biases `[output_dim, output_atoms]` (shared over positions),
        returns `[batch, height, width, output_dim, output_atoms]`;
    routing is done independently at every position. Any number of spatial axes works.

    Logits b `[batch, (spatial...), output_dim, input_dim]` start at zero. Each iteration:
        c = softmax(b) over output_dim (leaky: with an extra zero logit, dropped),
        s = sum over input_dim of c * votes + biases,
        v = squash(s) over atoms,
        b += <votes, v> over atoms.
    Differentiable through every iteration, as the reference (no stop_gradient).
    Returns the activation v of the last iteration.

    The reference orders votes `[batch, input_dim, ..., output_dim, atoms]` and
    computes both sums by tiling and reduce_sum. Here input_dim sits next to the
    atoms, so that for every (batch, position, output capsule) the weighted sum is
    one matrix product `[1, input_dim] x [input_dim, atoms]` and the agreement one
    `[input_dim, atoms] x [atoms, 1]`: batched matmuls, no tiles or transposes.
    Same values (benchmarks/throughput.py times both). The iterations are unrolled
    (num_routing is a Python int) and the gradient is written out, see `_route`.
    """
    if num_routing < 1:
        raise ValueError(f"num_routing must be >= 1, got {num_routing}")
    votes = tf.convert_to_tensor(votes)
    if votes.shape.rank is not None and votes.shape.rank < 4:
        raise ValueError(
            "votes must be [batch, (spatial...), output_dim, input_dim, output_atoms], "
            f"got shape {votes.shape}"
        )
    if num_routing == 1:
        # One iteration (the primary capsules): zero logits route the same share,
        # softmax(0) = 1/output_dim (1/(output_dim + 1) leaky), of every vote, so
        # s = share * sum_i votes + biases: no logits, routes or matmuls to form.
        output_dim = votes.shape[-3]
        if output_dim is None:
            output_dim = tf.shape(votes)[-3]
        share = 1.0 / tf.cast(output_dim + int(leaky), votes.dtype)
        return squash(tf.reduce_sum(votes, axis=-2) * share + biases, axis=-1)
    return _route(votes, tf.convert_to_tensor(biases, votes.dtype), num_routing, leaky)


def _vector_jacobian(fn, x: tf.Tensor, upstream: tf.Tensor) -> tf.Tensor:
    """upstream^T d fn(x) / dx, by autodiff of the (small, elementwise-sized) `fn`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.gradient(y, x, output_gradients=upstream)


def _route(votes: tf.Tensor, biases: tf.Tensor, num_routing: int, leaky: bool) -> tf.Tensor:
    """`num_routing` (>= 2) iterations of routing, with their gradient written out.

    Autodiff of the iterations would form, for each weighted sum and each
    agreement, an outer product of the size of the votes and then add them up
    (2 * num_routing - 1 tensors of the votes' size). Here the backward pass
    runs the iterations in reverse, keeping the votes-sized work to one
    contraction per sum or agreement (none for the first iteration's constant
    logits) and a single matrix product for the votes' gradient:
        d_votes = [c_1 .. c_n, G_2 .. G_n] x [ds_1 .. ds_n, v_1 .. v_n-1]
    (c_r routes, ds_r gradients of the pre-activations s_r, v_r activations,
    G_r the gradient of the logits of iteration r). The softmax's and squash's
    own gradients, on small tensors, come from autodiff. Equal to autodiff of
    the plain loop to float32 round-off (tests/test_ops.py, test_fast_paths.py).
    """

    @tf.custom_gradient
    def iterate(votes, biases):
        logits = [tf.zeros_like(votes[..., 0])]  # [..., output_dim, input_dim]
        routes, preactivations, activations = [], [], []
        for iteration in range(num_routing):
            route = _routing_softmax(logits[-1], leaky)
            preactivation = tf.squeeze(tf.matmul(route[..., None, :], votes), axis=-2) + biases
            activation = squash(preactivation, axis=-1)
            routes.append(route)
            preactivations.append(preactivation)
            activations.append(activation)
            # The last iteration's logit update would never be read.
            if iteration < num_routing - 1:
                # Agreement <u_hat_j|i, v_j> of every input capsule i with output capsule j.
                agreement = tf.squeeze(tf.matmul(votes, activation[..., None]), axis=-1)
                logits.append(logits[-1] + agreement)

        def grad(d_activation):
            lefts, rights = [], []  # d_votes = sum over terms of left (x) right
            d_logits = tf.zeros_like(logits[0])
            d_preactivations = []
            for iteration in reversed(range(num_routing)):
                d_pre = _vector_jacobian(squash, preactivations[iteration], d_activation)
                d_preactivations.append(d_pre)
                lefts.append(routes[iteration])
                rights.append(d_pre)
                if iteration > 0:  # the first iteration's logits are constant zeros
                    d_route = tf.squeeze(tf.matmul(votes, d_pre[..., None]), axis=-1)
                    d_logits += _vector_jacobian(
                        lambda x: _routing_softmax(x, leaky), logits[iteration], d_route
                    )
                    # logits[iteration] = logits[iteration - 1] + <votes, v_(iteration - 1)>
                    lefts.append(d_logits)
                    rights.append(activations[iteration - 1])
                    d_activation = tf.squeeze(tf.matmul(d_logits[..., None, :], votes), axis=-2)
            d_votes = tf.matmul(tf.stack(lefts, axis=-1), tf.stack(rights, axis=-2))
            d_biases = tf.add_n(d_preactivations)
            d_biases = tf.reduce_sum(d_biases, axis=list(range(d_biases.shape.rank - 2)))
            return d_votes, tf.reshape(d_biases, tf.shape(biases))

        return activations[-1], grad

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
