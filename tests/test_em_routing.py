"""EM routing (capsules.ops.em_routing, conv_em_routing) against NumPy and autodiff."""

import numpy as np
import pytest
import tensorflow as tf

from capsules import em_routing, ops
from tests import em_reference_numpy as ref
from tests.em_reference_tf import plain_conv_em_routing, plain_em_routing


def _random(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _uniform(shape, seed):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _dense_case(seed=0, batch=2, children=7, parents=3):
    votes = _random((batch, children, parents, 16), seed, 0.5)
    activations = _uniform((batch, children), seed + 1)
    beta_v = _random((parents,), seed + 2, 0.1)
    beta_a = _random((parents,), seed + 3, 0.01)
    return votes, activations, beta_v, beta_a


def _conv_case(seed=0, size=5, input_dim=2, output_dim=3, kernel_size=3, strides=2):
    out = (size - kernel_size) // strides + 1
    votes = _random((2, out, out, output_dim, kernel_size**2 * input_dim, 16), seed, 0.5)
    activations = _uniform((2, size, size, input_dim), seed + 1)
    beta_v = _random((output_dim,), seed + 2, 0.1)
    beta_a = _random((output_dim,), seed + 3, 0.01)
    return votes, activations, beta_v, beta_a


@pytest.mark.parametrize("num_routing", [1, 2, 3])
def test_em_routing_matches_numpy(num_routing):
    votes, activations, beta_v, beta_a = _dense_case()
    poses, parent_activations = ops.em_routing(votes, activations, beta_v, beta_a, num_routing,
                                               final_lambda=0.05)
    expected_poses, expected_activations, _ = ref.em_routing(
        votes, activations, beta_v, beta_a, num_routing, 0.05
    )
    assert poses.shape == (2, 3, 16) and parent_activations.shape == (2, 3)
    np.testing.assert_allclose(poses, expected_poses, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(parent_activations, expected_activations, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_routing", [1, 2, 3])
@pytest.mark.parametrize("size,kernel_size,strides", [(5, 3, 2), (5, 3, 1), (6, 2, 2)])
def test_conv_em_routing_matches_numpy(num_routing, size, kernel_size, strides):
    votes, activations, beta_v, beta_a = _conv_case(size=size, kernel_size=kernel_size,
                                                    strides=strides)
    poses, parent_activations = ops.conv_em_routing(
        votes, activations, beta_v, beta_a, kernel_size, strides, num_routing, 0.05
    )
    dense, mask = ref.conv_as_dense(votes, size, size, kernel_size, strides)
    positions = votes.shape[1] * votes.shape[2]
    expected_poses, expected_activations, _ = ref.em_routing(
        dense, activations.reshape(2, -1), np.tile(beta_v, positions),
        np.tile(beta_a, positions), num_routing, 0.05, mask, mass_scale=votes.shape[3],
    )
    np.testing.assert_allclose(poses.numpy().reshape(2, -1, 16), expected_poses, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(parent_activations.numpy().reshape(2, -1), expected_activations,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strides", [1, 2])
def test_each_child_assignments_sum_to_one_over_all_its_parents(strides):
    votes, activations, *_ = _conv_case(size=7, strides=strides)
    grid = em_routing.ChildGrid(7, 7, 2, 3, strides)
    out = votes.shape[1]
    logits = tf.constant(_random((2, out * out, 3, 9 * 2), 5, 30.0))
    routes = grid.normalise(logits).numpy()  # [batch, positions, parents, k^2 * input_dim]
    per_vote = routes.sum(axis=2).reshape(2, out * out * 9, 2)
    per_child = grid.scatter_sum(tf.constant(per_vote)).numpy()
    np.testing.assert_allclose(per_child, 1.0, rtol=1e-5)
    # The uniform start: a child's share is 1 / (its covering positions x output types).
    uniform = grid.normalise(tf.zeros_like(logits)).numpy()
    dense, mask = ref.conv_as_dense(np.zeros((1, out, out, 3, 18, 16)), 7, 7, 3, strides)
    parents_of_child = mask.sum(axis=1).reshape(7 * 7, 2)
    shares = grid.gather(tf.constant(1.0 / parents_of_child[None])).numpy()
    for image in range(2):
        np.testing.assert_allclose(uniform[image, :, 0].reshape(-1, 2), shares[0], rtol=1e-6)


def _gradients(routing, *tensors):
    tensors = [tf.constant(t) for t in tensors]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        poses, activations = routing(*tensors)
        # A loss that reaches every output.
        loss = tf.reduce_sum(tf.sin(3.0 * poses)) + tf.reduce_sum(tf.square(activations) * 7.0)
    return [poses, activations], tape.gradient(loss, tensors)


# The official variance floor and cost scale, and a recipe's (docs/em_routing.md).
DEPARTURES = [{}, {"variance_floor": 1e-8, "cost_scale": 7.0}]


@pytest.mark.parametrize("num_routing", [1, 2, 3])
@pytest.mark.parametrize("departures", DEPARTURES)
def test_dense_gradient_equals_autodiff_of_the_plain_loop(num_routing, departures):
    case = _dense_case(4)
    outputs, grads = _gradients(
        lambda *t: ops.em_routing(*t, num_routing=num_routing, final_lambda=0.05,
                                  **departures), *case)
    plain_outputs, plain_grads = _gradients(
        lambda *t: plain_em_routing(*t, num_routing=num_routing, final_lambda=0.05,
                                    **departures), *case)
    for got, want in zip(outputs + grads, plain_outputs + plain_grads, strict=True):
        scale = np.abs(want.numpy()).max()
        np.testing.assert_allclose(got, want, atol=2e-4 * scale + 1e-7)


@pytest.mark.parametrize("num_routing", [1, 3])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("departures", DEPARTURES)
def test_conv_gradient_equals_autodiff_of_the_plain_loop(num_routing, strides, departures):
    votes, activations, beta_v, beta_a = _conv_case(6, strides=strides)
    plain_votes = np.moveaxis(votes, 3, 4)  # the plain form takes children before parents

    def package(v, a, bv, ba):
        return ops.conv_em_routing(v, a, bv, ba, 3, strides, num_routing, 0.05, **departures)

    def plain(v, a, bv, ba):
        return plain_conv_em_routing(v, a, bv, ba, 3, strides, num_routing, 0.05,
                                     **departures)

    outputs, grads = _gradients(package, votes, activations, beta_v, beta_a)
    plain_outputs, plain_grads = _gradients(plain, plain_votes, activations, beta_v, beta_a)
    plain_grads[0] = tf.constant(np.moveaxis(plain_grads[0].numpy(), 4, 3))
    for got, want in zip(outputs + grads, plain_outputs + plain_grads, strict=True):
        scale = np.abs(want.numpy()).max()
        np.testing.assert_allclose(got, want, atol=2e-4 * scale + 1e-7)


@pytest.fixture
def compiled(monkeypatch):
    """Routings of any size run XLA-compiled (em_routing._Iterations), as large ones do."""
    monkeypatch.setattr(em_routing, "_XLA_MIN_VOTES_PER_EXAMPLE", 0)


@pytest.mark.parametrize("departures", DEPARTURES)
def test_compiled_dense_routing_equals_autodiff_of_the_plain_loop(compiled, departures):
    test_dense_gradient_equals_autodiff_of_the_plain_loop(2, departures)


@pytest.mark.parametrize("strides", [1, 2])
def test_compiled_conv_routing_equals_autodiff_of_the_plain_loop(compiled, strides):
    test_conv_gradient_equals_autodiff_of_the_plain_loop(2, strides, DEPARTURES[1])


@pytest.mark.slow
def test_compiled_float32_gradients_keep_their_precision(compiled):
    # The whole tiny EMCapsNet, float32 against float64, through the compiled iterations
    # (their E-step bias summed in float64, as the plain ones').
    from tests.test_em_capsnet import test_float32_gradients_keep_their_precision

    test_float32_gradients_keep_their_precision()


@pytest.mark.parametrize("num_routing", [1, 2, 3, 4, 5])
@pytest.mark.slow
def test_finite_for_zero_inputs_and_single_child_parents(num_routing):
    # All-zero votes and activations: empty parents.
    zeros = _gradients(lambda v, a, bv, ba: ops.conv_em_routing(v, a, bv, ba, 3, 2, num_routing),
                       *(np.zeros_like(t) for t in _conv_case()))
    # A 3x3 grid, kernel 1: every parent has one child per input type; one input type.
    single = _gradients(
        lambda v, a, bv, ba: ops.conv_em_routing(v, a, bv, ba, 1, 1, num_routing),
        _random((2, 3, 3, 4, 1, 16), 3), _uniform((2, 3, 3, 1), 4), np.zeros(4, np.float32),
        np.zeros(4, np.float32),
    )
    dense = _gradients(lambda *t: ops.em_routing(*t, num_routing=num_routing),
                       *_dense_case(children=1))
    for outputs, grads in (zeros, single, dense):
        for tensor in outputs + grads:
            assert np.all(np.isfinite(tensor.numpy()))
    # A single child: its parents' poses are its votes (the variance floor keeps them finite).
    votes, activations, beta_v, beta_a = _dense_case(children=1)
    poses, _ = ops.em_routing(votes, activations, beta_v, beta_a, num_routing)
    np.testing.assert_allclose(poses, votes[:, 0], rtol=1e-4, atol=1e-5)


def test_inverse_temperatures_are_the_official_schedule():
    np.testing.assert_allclose(em_routing.inverse_temperatures(3, 0.01),
                               [0.01 * 0.05, 0.01 * (1 - 0.95**2), 0.01 * (1 - 0.95**3)])


def test_bad_arguments_raise():
    votes, activations, beta_v, beta_a = _dense_case()
    with pytest.raises(ValueError, match="num_routing must be a positive integer, got 0"):
        ops.em_routing(votes, activations, beta_v, beta_a, num_routing=0)
    with pytest.raises(ValueError, match="variance_floor must be > 0, got 0"):
        ops.em_routing(votes, activations, beta_v, beta_a, variance_floor=0)
    with pytest.raises(ValueError, match="cost_scale must be > 0, got -1"):
        ops.em_routing(votes, activations, beta_v, beta_a, cost_scale=-1)
    with pytest.raises(ValueError, match=r"votes must be \[batch, input_dim, output_dim, 16\]"):
        ops.em_routing(votes[..., :8], activations, beta_v, beta_a)
    conv_votes, conv_activations, beta_v, beta_a = _conv_case()
    with pytest.raises(ValueError, match="kernel_size=3, strides=1"):
        ops.conv_em_routing(conv_votes, conv_activations, beta_v, beta_a, 3, 1)


@pytest.mark.slow
def test_compiles_with_xla():
    votes, activations, beta_v, beta_a = _conv_case()

    @tf.function(jit_compile=True)
    def routed_gradient(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            _, parents = ops.conv_em_routing(v, activations, beta_v, beta_a, 3, 2)
            loss = tf.reduce_sum(parents)
        return parents, tape.gradient(loss, v)

    parents, gradient = routed_gradient(tf.constant(votes))
    expected = ops.conv_em_routing(votes, activations, beta_v, beta_a, 3, 2)[1]
    np.testing.assert_allclose(parents, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(gradient.numpy()))
