"""capsules.ops against the NumPy statement of the reference's equations."""

import numpy as np
import pytest
import tensorflow as tf

from capsules import ops
from tests import reference_numpy as ref
from tests.reference_tf import plain_update_routing

RTOL = 1e-5


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(4, 8), (2, 3, 16), (1, 5, 5, 4, 8)])
def test_squash_matches_numpy(shape):
    x = _random(shape, 0)
    np.testing.assert_allclose(ops.squash(x).numpy(), ref.squash(x.astype(np.float64)),
                               rtol=RTOL, atol=1e-7)


def test_squash_norm_is_below_one_and_keeps_direction():
    x = _random((100, 16), 1) * 10
    v = ops.squash(x).numpy()
    norms = np.linalg.norm(v, axis=-1)
    assert np.all(norms < 1.0)
    cosine = np.sum(v * x, axis=-1) / (norms * np.linalg.norm(x, axis=-1))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)


def test_squash_and_safe_norm_value_and_gradient_finite_at_zero():
    x = tf.zeros([3, 8])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        squashed = ops.squash(x)
        norm = ops.safe_norm(x)
    assert np.all(squashed.numpy() == 0.0)
    assert np.all(np.isfinite(tape.gradient(squashed, x).numpy()))
    assert np.all(np.isfinite(tape.gradient(norm, x).numpy()))
    np.testing.assert_allclose(norm.numpy(), 0.0, atol=1e-5)


def test_safe_norm_matches_numpy_and_keepdims():
    x = _random((4, 3, 16), 2)
    np.testing.assert_allclose(ops.safe_norm(x, axis=1).numpy(), np.linalg.norm(x, axis=1),
                               rtol=RTOL)
    assert ops.safe_norm(x, keepdims=True).shape == (4, 3, 1)


_FULLY_CONNECTED = [(3, 7, 5, 4), (2, 11, 10, 16)]  # [batch, in, out, atoms]
_CONVOLUTIONAL = [(2, 4, 3, 8, 3, 4)]  # [batch, in, out, atoms, height, width]


@pytest.mark.parametrize("num_routing", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("votes_shape", _FULLY_CONNECTED + _CONVOLUTIONAL)
def test_update_routing_in_the_reference_layouts_matches_numpy(votes_shape, num_routing, leaky):
    votes = _random(votes_shape, 3)
    biases = _random(votes_shape[2:4], 4) * 0.1
    want = ref.update_routing(votes, biases.astype(np.float64), num_routing, leaky)
    for bias_shape in {votes_shape[2:4], votes_shape[2:4] + (1, 1)[:len(votes_shape) - 4]}:
        got = ops.update_routing(tf.constant(votes), tf.constant(biases.reshape(bias_shape)),
                                 num_routing, leaky)
        assert got.shape == (votes_shape[0], *votes_shape[2:])
        np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("votes_shape", [_FULLY_CONNECTED[0], _CONVOLUTIONAL[0]])
@pytest.mark.slow
def test_update_routing_takes_a_num_routing_tensor(votes_shape):
    votes, biases = _random(votes_shape, 12), _random(votes_shape[2:4], 13) * 0.1
    routing = tf.function(lambda v, n: ops.update_routing(v, biases, n, leaky=True))
    for num_routing in (1, 2, 4):
        want = ref.update_routing(votes, biases.astype(np.float64), num_routing, True)
        for n in (tf.constant(num_routing), tf.constant(num_routing, tf.int64)):
            np.testing.assert_allclose(ops.update_routing(votes, biases, n, leaky=True).numpy(),
                                       want, rtol=RTOL, atol=1e-6)
        # One graph for every iteration count.
        np.testing.assert_allclose(routing(votes, tf.constant(num_routing)).numpy(), want,
                                   rtol=RTOL, atol=1e-6)
    assert routing.experimental_get_tracing_count() == 1


def test_more_routing_iterations_change_the_output():
    votes, biases = _random((2, 9, 5, 4), 5), np.zeros((5, 4), np.float32)
    outputs = [ops.update_routing(votes, biases, n).numpy() for n in (1, 2, 3)]
    assert not np.allclose(outputs[0], outputs[1], atol=1e-4)
    assert not np.allclose(outputs[1], outputs[2], atol=1e-4)


def test_leaky_routes_sum_to_less_than_one():
    logits = tf.constant(_random((2, 5, 6), 6))  # [batch, out, in]
    routes = ops._routing_softmax(logits, leaky=True).numpy()
    assert np.all(routes.sum(axis=-2) < 1.0)
    np.testing.assert_allclose(ops._routing_softmax(logits, leaky=False).numpy().sum(-2), 1.0,
                               rtol=1e-6)


def test_one_iteration_routes_uniformly():
    votes = _random((2, 3, 3, 4, 1, 8), 7)  # the layers' layout [batch, h, w, out, in=1, atoms]
    biases = _random((4, 8), 8)
    for leaky, share in ((False, 1 / 4), (True, 1 / 5)):
        got = ops._update_routing_output_major(votes, biases, 1, leaky).numpy()
        np.testing.assert_allclose(got, ref.squash(votes[..., 0, :] * share + biases),
                                   rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("shape,num_routing,leaky", [
    ((4, 10, 12, 16), 3, False), ((4, 10, 12, 16), 3, True), ((3, 5, 7, 8), 2, False),
    ((3, 5, 7, 8), 5, True), ((2, 3, 3, 4, 6, 8), 3, True), ((2, 2, 3, 4, 6, 8), 4, False),
    ((3, 5, 7, 8), tf.constant(4), False),
])
def test_update_routing_gradient_equals_autodiff_of_the_plain_loop(shape, num_routing, leaky):
    # In the layers' layout [batch, (spatial...), out, in, atoms], as plain_update_routing.
    votes = tf.constant(_random(shape, 9))
    biases = tf.constant(_random(shape[-3:-2] + shape[-1:], 10) * 0.1)
    weights = tf.constant(_random(shape[:-2] + shape[-1:], 11))  # one upstream value each
    gradients = []
    for routing, iterations in ((ops._update_routing_output_major, num_routing),
                                (plain_update_routing, int(num_routing))):
        with tf.GradientTape() as tape:
            tape.watch([votes, biases])
            out = tf.reduce_sum(routing(votes, biases, iterations, leaky) * weights)
        gradients.append(tape.gradient(out, [votes, biases]))
    for ours, plain in zip(*gradients, strict=True):
        assert ours.shape == plain.shape
        np.testing.assert_allclose(ours.numpy(), plain.numpy(), rtol=1e-4, atol=1e-5)


def _while_loops(graph: tf.Graph) -> int:
    return sum(op.type in ("While", "StatelessWhile") for op in graph.get_operations())


def test_update_routing_and_its_gradient_run_in_while_loops():
    votes, biases = tf.constant(_random((2, 6, 3, 4), 14)), tf.zeros([3, 4])
    forward = tf.function(lambda v: ops.update_routing(v, biases, 3))
    assert _while_loops(forward.get_concrete_function(votes).graph) == 1

    @tf.function
    def gradient(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            out = tf.reduce_sum(ops.update_routing(v, biases, 3) ** 2)
        return tape.gradient(out, v)

    assert _while_loops(gradient.get_concrete_function(votes).graph) == 2  # forward, reverse


@pytest.mark.slow
def test_update_routing_compiles_with_xla():
    votes, biases = _random((2, 6, 3, 4), 10), np.zeros((3, 4), np.float32)
    compiled = tf.function(lambda v: ops.update_routing(v, biases, 3), jit_compile=True)
    np.testing.assert_allclose(compiled(votes).numpy(),
                               ops.update_routing(votes, biases, 3).numpy(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("leaky", [False, True])
def test_update_routing_gradient_compiles_with_xla(leaky):
    votes, biases = tf.constant(_random((2, 6, 3, 4), 11)), tf.zeros([3, 4])

    def gradient(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            out = tf.reduce_sum(ops.update_routing(v, biases, 3, leaky) ** 2)
        return tape.gradient(out, v)

    compiled = tf.function(gradient, jit_compile=True)
    np.testing.assert_allclose(compiled(votes).numpy(), gradient(votes).numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, tf.constant(0), tf.constant([3]), 2.0])
def test_update_routing_rejects_bad_iterations(bad):
    with pytest.raises(ValueError, match="num_routing"):
        ops.update_routing(tf.zeros([1, 4, 3, 2]), tf.zeros([3, 2]), bad)


@pytest.mark.parametrize("votes_shape,bias_shape,message", [
    ((2, 3, 4), (3, 4), r"votes must be \[batch, input_dim, output_dim, output_atoms\]"),
    ((2, 5, 3, 4, 6), (3, 4), r"or \[batch, input_dim, output_dim, output_atoms, height, width\]"),
    ((2, 5, 3, 4), (4, 3), r"biases must be \[output_dim, output_atoms\] for votes \[batch, "
                           r"input_dim, output_dim, output_atoms\]"),
    ((2, 5, 3, 4), (3, 4, 1, 1), r"biases must be \[output_dim, output_atoms\] for"),
    ((2, 5, 3, 4, 6, 6), (3, 4, 6, 6), r"biases must be \[output_dim, output_atoms\] or "
                                       r"\[output_dim, output_atoms, 1, 1\] for votes"),
    ((2, 5, 3, 4, 6, 6), (12,), r"got shape \(12,\)"),
])
def test_update_routing_rejects_votes_or_biases_of_another_layout(votes_shape, bias_shape,
                                                                  message):
    with pytest.raises(ValueError, match=message):
        ops.update_routing(tf.zeros(votes_shape), tf.zeros(bias_shape), 3)


def test_package_layout_votes_raise_in_the_public_op():
    # [batch, out, in, atoms] votes (the layers' layout) with in != out do not fit the biases.
    with pytest.raises(ValueError, match="biases must be"):
        ops.update_routing(tf.zeros([2, 10, 1152, 16]), tf.zeros([10, 16]), 3)


def test_margin_loss_reference_worked_example():
    # The reference's layers_test: labels [[0,0,1],[1,1,1]], logits
    # [[-0.3,0.3,0.9],[1.2,0.5,-0.5]].
    labels = np.array([[0, 0, 1], [1, 1, 1]], np.float32)
    logits = np.array([[-0.3, 0.3, 0.9], [1.2, 0.5, -0.5]], np.float32)
    costs = ops.margin_loss(labels, logits).numpy()
    assert costs.shape == (2, 3)
    np.testing.assert_allclose(costs.sum(), 0.5 * (0.5 * 0.2 * 0.2 + 0.4 * 0.4 + 1.4 * 1.4),
                               rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_loss_matches_numpy_cases(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random((8, 10)) < 0.2).astype(np.float32)
    lengths = rng.random((8, 10)).astype(np.float32)
    np.testing.assert_allclose(ops.margin_loss(labels, lengths).numpy(),
                               ref.margin_costs(labels, lengths), rtol=RTOL, atol=1e-8)
