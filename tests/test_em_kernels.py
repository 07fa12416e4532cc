"""capsules/em_kernels.py: the compiled passes against the stored-votes formulas, the
convolutional layer with and without them, and the fallback where they cannot be built."""

import numpy as np
import pytest
import tensorflow as tf
from absl import logging

from capsules import em_kernels, em_layers, em_routing

pytestmark = pytest.mark.skipif(
    not em_kernels.available(),
    reason="the EM routing kernels are not built here (no C++ compiler, a GPU, or "
    "CAPSULES_EM_KERNELS=0)",
)

# Groups, children (not a multiple of the 16 lanes), parents, terms of the gradient.
G, N, C, K = 5, 18, 3, 3


def _random(*shape, seed):
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _stored_votes(patches, kernel, center):
    """V_gcn = P_gn W_nc - center_gc `[G, C, N, 16]`, as a tensor."""
    votes = tf.einsum("gnij,ncjk->gcnik", tf.reshape(patches, [G, N, 4, 4]),
                      tf.reshape(kernel, [N, C, 4, 4]))
    return tf.reshape(votes, [G, C, N, 16]) - center[:, :, None]


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5,
                               atol=1e-5 * float(tf.reduce_max(tf.abs(expected))))


@pytest.fixture
def votes():
    return _random(G, N, 16, seed=1), _random(N, C, 16, seed=2), _random(G, C, 16, seed=3)


def test_sums_and_distances_equal_the_stored_votes(votes):
    routes, weights = _random(G, C, N, seed=4), _random(G, C, 32, seed=5)
    stored = _stored_votes(*votes)
    _close(em_kernels.vote_sums(*votes, routes),
           tf.concat([tf.einsum("gcn,gcnh->gch", routes, stored),
                      tf.einsum("gcn,gcnh->gch", routes, stored**2)], axis=-1))
    _close(em_kernels.vote_distances(*votes, weights),
           tf.einsum("gcnh,gch->gcn", stored, weights[..., :16])
           + tf.einsum("gcnh,gch->gcn", stored**2, weights[..., 16:]))


def test_gradient_equals_autodiff_of_the_stored_votes(votes):
    patches, kernel, center = votes
    lefts, rights = _random(K, G, C, N, seed=6), _random(K, G, C, 32, seed=7)
    with tf.GradientTape() as tape:
        tape.watch([patches, kernel])
        stored = _stored_votes(patches, kernel, center)
        # d[V, V^2] = sum_k lefts_k (x) rights_k
        loss = (tf.einsum("kgcn,gcnh,kgch->", lefts, stored, rights[..., :16])
                + tf.einsum("kgcn,gcnh,kgch->", lefts, stored**2, rights[..., 16:]))
    expected = tape.gradient(loss, [patches, kernel])
    actual = em_kernels.vote_gradient(patches, kernel, center, lefts, rights)
    for got, want in zip(actual, expected, strict=True):
        _close(got, want)
    # The kernel's gradient sums the groups in a fixed order: the same bits every time.
    again = em_kernels.vote_gradient(patches, kernel, center, lefts, rights)
    for first, second in zip(actual, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_a_bad_shape_names_the_input(votes):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"routes of shape \[5,3,32\]"):
        em_kernels.vote_sums(*votes, _random(G, C, 32, seed=4))
    patches, kernel, center = votes
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected \\[G, N, 16\\]"):
        em_kernels.vote_sums(patches, kernel[:-1], center, _random(G, C, N, seed=4))


def test_conv_layer_routes_the_same_with_and_without_the_kernels(monkeypatch):
    rng = np.random.default_rng(0)
    poses = tf.constant(rng.normal(size=[2, 7, 7, 3, 4, 4]).astype(np.float32))
    activations = tf.constant(rng.random(size=[2, 7, 7, 3]).astype(np.float32))
    layer = em_layers.ConvMatrixCapsule(4, kernel_size=3, strides=2, num_routing=3)

    def outputs_and_gradients():
        with tf.GradientTape() as tape:
            tape.watch([poses, activations])
            out_poses, out_activations = layer([poses, activations])
            loss = tf.reduce_sum(tf.sin(out_poses)) + tf.reduce_sum(out_activations**2)
        return [out_poses, out_activations,
                *tape.gradient(loss, [poses, activations, *layer.trainable_variables])]

    computed = outputs_and_gradients()
    monkeypatch.setenv("CAPSULES_EM_KERNELS", "0")
    assert not em_kernels.available()
    stored = outputs_and_gradients()
    for got, want in zip(computed, stored, strict=True):
        _close(got, want)


def test_without_a_compiler_the_routing_stores_its_votes(monkeypatch, tmp_path):
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CAPSULES_CACHE_DIR", str(tmp_path / "cache"))
    em_kernels.load.cache_clear()
    try:
        assert em_kernels.load() is None
        assert not em_kernels.available()
        assert len(warnings) == 1 and "kernels unavailable" in warnings[0]
        assert "no-such-compiler" in warnings[0]
        poses, activations = tf.zeros([1, 3, 3, 2, 4, 4]), tf.ones([1, 3, 3, 2])
        out_poses, _ = em_layers.ConvMatrixCapsule(2, kernel_size=3)([poses, activations])
        assert out_poses.shape == (1, 1, 1, 2, 4, 4)
    finally:
        em_kernels.load.cache_clear()


def test_patches_that_do_not_fit_the_activations_are_refused():
    activations = tf.ones([1, 5, 5, 2])
    with pytest.raises(ValueError, match=r"expected \[batch, 2, 2, 18, 16\] and \[18, "):
        em_routing.conv_em_routing_of_patches(
            tf.zeros([1, 2, 2, 9, 16]), tf.zeros([18, 3, 16]), activations, tf.zeros([3]),
            tf.zeros([3]), kernel_size=3, strides=2)


def test_an_xla_compiled_function_routes_with_stored_votes():
    rng = np.random.default_rng(1)
    poses = tf.constant(rng.normal(size=[2, 5, 5, 2, 4, 4]).astype(np.float32))
    activations = tf.constant(rng.random(size=[2, 5, 5, 2]).astype(np.float32))
    layer = em_layers.ConvMatrixCapsule(3, kernel_size=3, strides=2, num_routing=2)
    eager = layer([poses, activations])
    compiled = tf.function(lambda *inputs: layer(list(inputs)), jit_compile=True)(
        poses, activations)
    for got, want in zip(compiled, eager, strict=True):
        _close(got, want)
