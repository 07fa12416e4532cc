"""Capsule layers: the shared layer checks, then values against the NumPy reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsules import layers
from tests import reference_numpy as ref
from tests.layer_test_case import run_layer_test

RTOL = 1e-5


def _random(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _set_random_weights(layer, seed=1, scale=0.1):
    layer.set_weights([_random(w.shape, seed + i, scale) for i, w in enumerate(layer.weights)])


def test_capsule_layer_checks(tmp_path):
    run_layer_test(layers.Capsule, {"num_capsules": 3, "atoms": 4, "num_routing": 2},
                   _random((2, 6, 5)), (2, 3, 4), tmp_path)


@pytest.mark.slow
def test_conv_capsule_layer_checks(tmp_path):
    run_layer_test(layers.ConvCapsule,
                   {"num_capsules": 3, "atoms": 4, "kernel_size": 3, "strides": 2,
                    "padding": "VALID", "leaky": True},
                   _random((2, 7, 7, 2, 5)), (2, 3, 3, 3, 4), tmp_path)


@pytest.mark.parametrize("flatten,shape", [(True, (2, 3 * 4 * 4, 4)), (False, (2, 4, 4, 3, 4))])
def test_primary_capsule_layer_checks(tmp_path, flatten, shape):
    run_layer_test(layers.PrimaryCapsule,
                   {"num_capsules": 3, "atoms": 4, "kernel_size": 3, "strides": 2,
                    "padding": "SAME", "flatten": flatten},
                   _random((2, 8, 8, 6)), shape, tmp_path)


def test_length_layer_checks(tmp_path):
    run_layer_test(layers.Length, {}, _random((3, 10, 16)), (3, 10), tmp_path)


def test_decoder_layer_checks(tmp_path):
    mask = np.eye(5, dtype=np.float32)[[0, 3]]
    run_layer_test(layers.ReconstructionDecoder, {"num_pixels": 12, "layer_sizes": (8, 6)},
                   [_random((2, 5, 4)), mask], (2, 12), tmp_path)


@pytest.mark.parametrize("num_routing", [1, 3])
@pytest.mark.parametrize("leaky", [False, True])
def test_capsule_matches_reference_tiling(num_routing, leaky):
    layer = layers.Capsule(4, 6, num_routing=num_routing, leaky=leaky)
    inputs = _random((3, 10, 8), 2)
    layer.build(inputs.shape)
    _set_random_weights(layer)
    kernel, bias = (w.numpy() for w in layer.weights)
    votes = ref.fc_capsule_votes(inputs.astype(np.float64), kernel, 4, 6)
    np.testing.assert_allclose(layer(inputs).numpy(),
                               ref.routing(votes, bias, num_routing, leaky), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("num_routing,leaky", [(1, False), (3, False), (3, True)])
def test_conv_capsule_matches_numpy(padding, num_routing, leaky):
    layer = layers.ConvCapsule(3, 4, kernel_size=3, strides=2, padding=padding,
                               num_routing=num_routing, leaky=leaky)
    inputs = _random((2, 7, 7, 2, 5), 3)
    layer.build(inputs.shape)
    _set_random_weights(layer, scale=0.3)
    kernel, bias = (w.numpy() for w in layer.weights)
    votes = ref.conv_capsule_votes(inputs.astype(np.float64), kernel, 3, 4, 2, padding)
    np.testing.assert_allclose(layer(inputs).numpy(),
                               ref.routing(votes, bias, num_routing, leaky), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("leaky", [False, True])
def test_primary_capsule_scales_by_one_over_num_capsules_and_flattens_type_major(leaky):
    layer = layers.PrimaryCapsule(4, 8, kernel_size=3, strides=2, padding="VALID", leaky=leaky)
    features = _random((2, 9, 9, 6), 4)
    layer.build(features.shape)
    _set_random_weights(layer, scale=0.5)
    kernel, bias = (w.numpy() for w in layer.weights)
    conv = ref.conv2d_nhwc(features.astype(np.float64), kernel, 2, "VALID")  # [2, 4, 4, 32]
    share = 1.0 / (4 + leaky)
    grid = ref.squash(conv.reshape(2, 4, 4, 4, 8) * share + bias)  # [b, row, col, type, atom]
    want = np.stack([grid[:, r, c, t] for t in range(4) for r in range(4) for c in range(4)], 1)
    np.testing.assert_allclose(layer(features).numpy(), want, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(
        layer(features).numpy(),
        ref.primary_capsules(features, kernel, bias, 4, 8, 2, "VALID", leaky), rtol=RTOL,
        atol=1e-6)


def test_length_matches_numpy_norm():
    x = _random((4, 10, 16), 5)
    np.testing.assert_allclose(layers.Length()(x).numpy(), np.linalg.norm(x, axis=-1), rtol=RTOL)


def test_decoder_depends_only_on_the_masked_capsule():
    decoder = layers.ReconstructionDecoder(20, layer_sizes=(16, 16))
    capsules = _random((3, 5, 4), 6)
    mask = np.eye(5, dtype=np.float32)[[1, 1, 4]]
    out = decoder([capsules, mask]).numpy()
    changed = capsules.copy()
    changed[:, [0, 2, 3]] = _random((3, 3, 4), 7)  # never the target capsules 1 and 4
    np.testing.assert_allclose(decoder([changed, mask]).numpy(), out, rtol=1e-6)
    changed[0, 1] += 1.0  # the target of example 0
    moved = decoder([changed, mask]).numpy()
    assert not np.allclose(moved[0], out[0])
    np.testing.assert_allclose(moved[1:], out[1:], rtol=1e-6)
    assert np.all((out > 0) & (out < 1))


def test_decoder_matches_numpy_dense_stack():
    decoder = layers.ReconstructionDecoder(6, layer_sizes=(5, 4))
    capsules, mask = _random((2, 3, 2), 8), np.eye(3, dtype=np.float32)[[2, 0]]
    decoder([capsules, mask])
    hidden = (capsules * mask[:, :, None]).reshape(2, -1).astype(np.float64)
    for i, dense in enumerate(decoder.dense_layers):
        kernel, bias = (w.numpy() for w in dense.weights)
        hidden = hidden @ kernel + bias
        hidden = 1 / (1 + np.exp(-hidden)) if i == 2 else np.maximum(hidden, 0)
    np.testing.assert_allclose(decoder([capsules, mask]).numpy(), hidden, rtol=RTOL, atol=1e-7)


def test_reference_initializers():
    layer = layers.Capsule(10, 16)
    layer.build((None, 1152, 8))
    kernel = layer.kernel.numpy()
    assert abs(kernel.std() - 0.1 * 0.88) < 0.005  # truncated at 2 stddev: std 0.088
    assert np.abs(kernel).max() <= 0.2 + 1e-6
    np.testing.assert_array_equal(layer.bias.numpy(), np.full((10, 16), 0.1, np.float32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: layers.Capsule(0, 16),
        lambda: layers.Capsule(10, 0),
        lambda: layers.Capsule(10, 16, num_routing=0),
        lambda: layers.ConvCapsule(4, 8, padding="FULL"),
        lambda: layers.ConvCapsule(4, 8, kernel_size=0),
        lambda: layers.ReconstructionDecoder(0),
    ],
)
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError, match="must be"):
        make()


@pytest.mark.parametrize(
    "layer,shape,expected",
    [
        (layers.Capsule(3, 4), (2, 6), r"\[batch, input_dim, input_atoms\]"),
        (layers.ConvCapsule(3, 4), (2, 7, 7, 5), r"\[batch, height, width, input_dim"),
        (layers.PrimaryCapsule(3, 4), (2, 7, 7), r"\[batch, height, width, channels\]"),
        (layers.Length(), (16,), r"expected min_ndim=2, found ndim=1"),  # no batch axis
    ],
)
def test_wrong_rank_names_the_expected_shape(layer, shape, expected):
    with pytest.raises(ValueError, match=expected):
        layer(tf.zeros(shape))


def test_decoder_wrong_rank_names_the_expected_shapes():
    with pytest.raises(ValueError, match=r"expects \[capsules \[batch, num_capsules, atoms\]"):
        layers.ReconstructionDecoder(4)([tf.zeros([2, 3]), tf.zeros([2, 3])])


def test_wrong_input_dim_after_build_raises():
    layer = layers.Capsule(3, 4)
    layer(tf.zeros([2, 6, 5]))
    with pytest.raises(ValueError, match="incompatible"):
        layer(tf.zeros([2, 7, 5]))


def test_layers_are_registered_for_deserialization():
    for cls in (layers.Capsule, layers.ConvCapsule, layers.PrimaryCapsule, layers.Length,
                layers.ReconstructionDecoder):
        assert keras.saving.get_registered_object(f"capsules>{cls.__name__}") is cls
