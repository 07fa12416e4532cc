"""Matrix capsule layers: the shared layer checks, shapes, and values against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsules import em_layers
from tests import em_reference_numpy as ref
from tests.layer_test_case import run_layer_test


def _random(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _capsules(batch, size, types, seed=0):
    poses = _random((batch, size, size, types, 4, 4), seed, 0.5)
    activations = np.random.default_rng(seed + 1).random((batch, size, size, types))
    return poses, activations.astype(np.float32)


@pytest.mark.slow
def test_primary_matrix_capsule_checks(tmp_path):
    run_layer_test(em_layers.PrimaryMatrixCapsule, {"num_capsules": 3},
                   _random((2, 5, 5, 4)), ((2, 5, 5, 3, 4, 4), (2, 5, 5, 3)), tmp_path)


@pytest.mark.slow
def test_conv_matrix_capsule_checks(tmp_path):
    run_layer_test(em_layers.ConvMatrixCapsule,
                   {"num_capsules": 3, "kernel_size": 3, "strides": 2, "num_routing": 2,
                    "final_lambda": 0.05},
                   list(_capsules(2, 5, 2)), ((2, 2, 2, 3, 4, 4), (2, 2, 2, 3)), tmp_path)


@pytest.mark.slow
def test_class_matrix_capsule_checks(tmp_path):
    run_layer_test(em_layers.ClassMatrixCapsule,
                   {"num_classes": 4, "num_routing": 2, "coordinate_addition": False},
                   list(_capsules(2, 3, 2)), ((2, 4, 4, 4), (2, 4)), tmp_path)


def test_walkthrough_shapes():
    # 16 capsule types on a 12x12 grid, a 3x3 kernel at stride 2: a 5x5 grid of 16 types.
    layer = em_layers.ConvMatrixCapsule(16, kernel_size=3, strides=2)
    poses, activations = layer(list(_capsules(1, 12, 16)))
    assert poses.shape == (1, 5, 5, 16, 4, 4) and activations.shape == (1, 5, 5, 16)
    assert layer.kernel.shape == (3, 3, 16, 16, 4, 4)
    assert layer.beta_a.shape == layer.beta_v.shape == (16,)
    assert np.all(np.isfinite(poses.numpy())) and np.all(np.isfinite(activations.numpy()))


def test_layers_compose_in_a_functional_model():
    inputs = keras.Input((16, 16, 1))
    hidden = keras.layers.Conv2D(4, 5, strides=2, activation="relu")(inputs)  # 6x6
    capsules = em_layers.PrimaryMatrixCapsule(3)(hidden)
    capsules = em_layers.ConvMatrixCapsule(3, kernel_size=3, strides=2)(capsules)  # 2x2
    capsules = em_layers.ConvMatrixCapsule(3, kernel_size=2)(capsules)  # 1x1
    poses, activations = em_layers.ClassMatrixCapsule(5)(capsules)
    model = keras.Model(inputs, [poses, activations])
    assert tuple(poses.shape) == (None, 5, 4, 4) and tuple(activations.shape) == (None, 5)
    outputs = model(_random((2, 16, 16, 1)))
    assert outputs[0].shape == (2, 5, 4, 4) and np.all(np.isfinite(outputs[1].numpy()))


def test_primary_capsules_match_numpy():
    layer = em_layers.PrimaryMatrixCapsule(3)
    inputs = _random((2, 4, 4, 5), 1)
    poses, activations = layer(inputs)
    pose_kernel, activation_kernel = layer.pose_kernel.numpy(), layer.activation_kernel.numpy()
    np.testing.assert_allclose(poses, (inputs @ pose_kernel).reshape(2, 4, 4, 3, 4, 4),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(activations, 1 / (1 + np.exp(1.0 - inputs @ activation_kernel)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_routing", [1, 2, 3])
def test_conv_layer_matches_numpy(num_routing):
    layer = em_layers.ConvMatrixCapsule(3, kernel_size=3, strides=2, num_routing=num_routing,
                                        final_lambda=0.05)
    poses, activations = _capsules(2, 5, 2, seed=3)
    layer.build([poses.shape, activations.shape])
    layer.beta_v.assign(_random((3,), 7, 0.1))
    layer.beta_a.assign(_random((3,), 8, 0.01))
    out_poses, out_activations = layer([poses, activations])
    kernel = layer.kernel.numpy()  # [ky, kx, t, c, 4, 4]
    votes = np.zeros((2, 2, 2, 3, 18, 16))
    for oy in range(2):
        for ox in range(2):
            for c in range(3):
                for ky in range(3):
                    for kx in range(3):
                        for t in range(2):
                            pose = poses[:, 2 * oy + ky, 2 * ox + kx, t]
                            k = (ky * 3 + kx) * 2 + t
                            votes[:, oy, ox, c, k] = (pose @ kernel[ky, kx, t, c]).reshape(2, 16)
    np.testing.assert_allclose(layer.votes(tf.constant(poses)), votes, rtol=1e-5, atol=1e-5)
    dense, mask = ref.conv_as_dense(votes, 5, 5, 3, 2)
    expected_poses, expected_activations, _ = ref.em_routing(
        dense, activations.reshape(2, -1), np.tile(layer.beta_v.numpy(), 4),
        np.tile(layer.beta_a.numpy(), 4), num_routing, 0.05, mask, mass_scale=3,
    )
    np.testing.assert_allclose(out_poses.numpy().reshape(2, -1, 16), expected_poses,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out_activations.numpy().reshape(2, -1), expected_activations,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("coordinate_addition", [False, True])
def test_class_layer_matches_numpy(coordinate_addition):
    layer = em_layers.ClassMatrixCapsule(4, num_routing=3, coordinate_addition=coordinate_addition,
                                         final_lambda=0.05)
    poses, activations = _capsules(2, 3, 2, seed=5)
    out_poses, out_activations = layer([poses, activations])
    kernel = layer.kernel.numpy()  # [t, class, 4, 4]
    votes = np.einsum("bhwtil,tclj->bhwtcij", poses, kernel)
    if coordinate_addition:
        centres = (np.arange(3) + 0.5) / 3
        votes[..., 0, 3] += centres[None, :, None, None, None]  # row
        votes[..., 1, 3] += centres[None, None, :, None, None]  # column
    expected_poses, expected_activations, _ = ref.em_routing(
        votes.reshape(2, 18, 4, 16), activations.reshape(2, 18), layer.beta_v.numpy(),
        layer.beta_a.numpy(), 3, 0.05,
    )
    np.testing.assert_allclose(out_poses.numpy().reshape(2, 4, 16), expected_poses, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(out_activations, expected_activations, rtol=1e-4, atol=1e-6)


def test_mixed_precision_routes_in_float32():
    layer = em_layers.ConvMatrixCapsule(2, kernel_size=3, dtype="mixed_bfloat16")
    poses, activations = layer(list(_capsules(1, 3, 2)))
    assert layer.kernel.dtype == "float32" and activations.dtype == tf.float32
    assert np.all(np.isfinite(poses.numpy()))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: em_layers.PrimaryMatrixCapsule(0), "num_capsules=0"),
        (lambda: em_layers.ConvMatrixCapsule(4, kernel_size=0), "kernel_size=0"),
        (lambda: em_layers.ConvMatrixCapsule(4, num_routing=0), "num_routing=0"),
        (lambda: em_layers.ClassMatrixCapsule(5, final_lambda=-1.0), "final_lambda=-1.0"),
    ],
)
def test_bad_arguments_name_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_input_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"expects poses \[batch, height, width, types, 4, 4\]"):
        em_layers.ConvMatrixCapsule(2)([tf.zeros([1, 5, 5, 2, 16]), tf.zeros([1, 5, 5, 2])])
    with pytest.raises(ValueError, match="kernel_size=3 does not fit the 2x2"):
        em_layers.ConvMatrixCapsule(2)([tf.zeros([1, 2, 2, 2, 4, 4]), tf.zeros([1, 2, 2, 2])])
    with pytest.raises(ValueError, match="expects input"):
        em_layers.PrimaryMatrixCapsule(2)(tf.zeros([1, 5, 5]))


def test_conv_activations_follow_the_votes_at_the_official_initial_values():
    # The cost counts mass in the official units (output types x the paper's), so at the
    # official initial values the activations spread with the votes' agreement, as the
    # official ones do, instead of all sitting at sigmoid(lambda c_a beta_a) ~ 0.03.
    layer = em_layers.ConvMatrixCapsule(32, kernel_size=3, strides=2)
    rng = np.random.default_rng(0)
    poses = rng.normal(0.0, 0.3, (2, 7, 7, 32, 4, 4)).astype(np.float32)
    activations = rng.uniform(0.0, 1.0, (2, 7, 7, 32)).astype(np.float32)
    _, out_activations = layer([poses, activations])
    assert np.std(out_activations) > 0.1
    assert 0.1 < np.mean(out_activations) < 0.9
