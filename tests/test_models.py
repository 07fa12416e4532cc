"""CapsNet and ConvBaseline: sizes, values against NumPy, the loss, training and saving."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsules import CapsNet, ConvBaseline, default_hparams, losses, parse_overrides
from capsules.em_hparams import EMHParams
from capsules.models import EMCapsNet, flatten_depth_major
from capsules.optimizers import ReferenceDecay
from tests import reference_numpy as ref
from tests.test_em_capsnet import TINY as TINY_EM

CIFAR10 = "num_prime_capsules=64,padding=SAME,leaky=true,remake=false"


def _small(**overrides):
    """A CapsNet on 12x12x1 (SAME padding, 4 capsule types) that trains in a blink."""
    hparams = default_hparams().replace(padding="SAME", num_prime_capsules=4, **overrides)
    return CapsNet(hparams, input_shape=(12, 12, 1), num_classes=5)


def _images(n, shape=(12, 12, 1), seed=0):
    return np.random.default_rng(seed).random((n, *shape)).astype(np.float32)


@pytest.mark.parametrize(
    "overrides,input_shape,expected",
    [("", (28, 28, 1), 8_215_728), ("remake=false", (28, 28, 1), 6_804_384),
     (CIFAR10, (24, 24, 3), 22_476_448)],
)
def test_parameter_counts_match_the_paper(overrides, input_shape, expected):
    model = CapsNet(parse_overrides(default_hparams(), overrides), input_shape=input_shape)
    assert model.count_params() == expected


def test_baseline_count_from_its_layers():
    # VALID: 28 -conv-> 24 -pool-> 12 -conv-> 8 -pool-> 4; conv 5x5x1x512, conv 5x5x512x256,
    # fc (256*4*4)x1024, softmax 1024x10, with biases.
    expected = (25 * 512 + 512) + (25 * 512 * 256 + 256) + (256 * 16 * 1024 + 1024) + 10250
    assert ConvBaseline().count_params() == expected


@pytest.mark.slow
@pytest.mark.parametrize("overrides", ["", "leaky=true,routing=1"])
def test_capsnet_logits_match_numpy_forward_pass(overrides):
    model = CapsNet(parse_overrides(default_hparams(), overrides + ",remake=false" if overrides
                                    else "remake=false"))
    images = _images(2, (28, 28, 1), seed=1)
    weights = {
        "conv1/kernel": model.conv1.kernel.numpy(), "conv1/bias": model.conv1.bias.numpy(),
        "primary/kernel": model.primary_capsules.kernel.numpy(),
        "primary/bias": model.primary_capsules.bias.numpy(),
        "capsule2/kernel": model.class_capsules.kernel.numpy(),
        "capsule2/bias": model.class_capsules.bias.numpy(),
    }
    lengths, _ = ref.capsnet_logits(images.astype(np.float64), weights, 32, "VALID",
                                    model.hparams.routing, model.hparams.leaky)
    np.testing.assert_allclose(model(images).numpy(), lengths, rtol=1e-4, atol=1e-6)


def test_call_shapes_and_reconstruct():
    model = _small()
    images = _images(3)
    assert model(images).shape == (3, 5)
    assert model({"images": images}).shape == (3, 5)
    assert model.class_capsule_outputs(images).shape == (3, 5, 16)
    assert model.reconstruct(images, [0, 1, 4]).shape == (3, 12, 12, 1)
    one_hot = np.eye(5, dtype=np.float32)[[0, 1, 4]]
    np.testing.assert_allclose(model.reconstruct(images, one_hot).numpy(),
                               model.reconstruct(images, [0, 1, 4]).numpy())


def test_reconstruction_uses_only_the_target_capsule():
    model = _small()
    images = _images(2)
    capsules = model.class_capsule_outputs(images).numpy()
    mask = np.eye(5, dtype=np.float32)[[3, 3]]
    changed = capsules.copy()
    changed[:, [0, 1, 2, 4]] = 0.0
    np.testing.assert_allclose(model.decoder([changed, mask]).numpy(),
                               model.decoder([capsules, mask]).numpy(), rtol=1e-6)


@pytest.mark.parametrize("loss_form", ["reference", "paper"])
def test_loss_is_the_references(loss_form):
    model = _small(loss_form=loss_form)
    images, labels = _images(4), np.array([0, 2, 4, 1])
    results = model.compute_losses((images, labels))
    lengths = model(images).numpy()
    costs = ref.margin_costs(np.eye(5)[labels], lengths.astype(np.float64))
    margin = costs.mean() if loss_form == "reference" else (2 * costs).sum(axis=1).mean()
    remake = model.reconstruct(images, labels).numpy().reshape(4, -1)
    reconstruction = 0.0005 * np.mean(np.sum((remake - images.reshape(4, -1)) ** 2, axis=1))
    np.testing.assert_allclose(results["classification_loss"].numpy(), margin, rtol=1e-5)
    np.testing.assert_allclose(results["reconstruction_loss"].numpy(), reconstruction, rtol=1e-5)
    np.testing.assert_allclose(results["loss"].numpy(), margin + reconstruction, rtol=1e-5)


@pytest.mark.slow
def test_two_targets_reconstruct_both_with_shared_weights():
    model = _small()
    model = CapsNet(model.hparams, input_shape=(12, 12, 1), num_classes=5, num_targets=2)
    first, second = _images(2, seed=2), _images(2, seed=3)
    merged = np.minimum(first + second, 1.0)
    features = {
        "images": merged, "labels": np.eye(5, dtype=np.float32)[[0, 1]] + np.eye(5)[[2, 3]],
        "recons_image": first, "recons_label": np.array([0, 1], np.int32),
        "spare_image": second, "spare_label": np.array([2, 3], np.int32),
    }
    results = model.compute_losses(features)
    want = sum(
        0.0005 * np.mean(np.sum(
            (model.decoder([model.class_capsule_outputs(merged), np.eye(5)[label]]).numpy()
             - target.reshape(2, -1)) ** 2, axis=1))
        for label, target in ((features["recons_label"], first),
                              (features["spare_label"], second))
    )
    np.testing.assert_allclose(results["reconstruction_loss"].numpy(), want, rtol=1e-5)
    model.compile()
    logs = model.fit(tf.data.Dataset.from_tensors(features), verbose=0).history
    assert {"correct", "almost", "loss"} <= set(logs)


def test_count_found_targets():
    labels = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], np.float32)
    logits = np.array([[0.1, 0.9, 0.8, 0.0], [0.9, 0.8, 0.1, 0.0], [0.9, 0.8, 0.1, 0.0]])
    found = losses.count_found_targets(labels, logits.astype(np.float32), 2).numpy()
    np.testing.assert_array_equal(found, [2, 1, 0])


def test_default_optimizer_is_the_references():
    model = _small()
    model.compile()
    assert model.optimizer.epsilon == 1e-8
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, ReferenceDecay)
    for step, want in ((0, 1e-3), (2000, 1e-3 * 0.96), (3000, 1e-3 * 0.96**1.5), (10**6, 1e-6)):
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zeros", [False, True])
def test_fit_lowers_the_loss_without_nan(zeros):
    keras.utils.set_random_seed(0)
    model = _small()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, labels = _images(16, seed=4), np.arange(16) % 5
    if zeros:
        images[:4] = 0.0  # all-zero inputs give zero capsules: the safe norm keeps them finite
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    history = model.fit(dataset, epochs=8, verbose=0).history["loss"]
    assert all(np.isfinite(history))
    assert history[-1] < history[0]
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.slow
def test_fit_accepts_k_hot_labels_and_feature_dicts():
    model = _small()
    model.compile()
    images, labels = _images(4), np.eye(5, dtype=np.float32)[[0, 1, 2, 3]]
    assert "accuracy" in model.fit(
        tf.data.Dataset.from_tensors((images, labels)), verbose=0).history
    features = {"images": images, "labels": labels, "recons_image": images,
                "recons_label": np.array([0, 1, 2, 3], np.int32)}
    assert model.evaluate(tf.data.Dataset.from_tensors(features), verbose=0, return_dict=True)


@pytest.mark.slow
def test_xla_training_step_matches_the_plain_one():
    plain, compiled = _small(), _small()
    compiled.set_weights(plain.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(0.1))
    compiled.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    dataset = tf.data.Dataset.from_tensors((_images(4, seed=6), np.arange(4)))
    before = plain.get_weights()
    plain.fit(dataset, verbose=0)
    compiled.fit(dataset, verbose=0)
    for start, ours, theirs in zip(before, plain.get_weights(), compiled.get_weights(),
                                   strict=True):
        np.testing.assert_allclose(theirs - start, ours - start, rtol=0, atol=1e-5)
    assert any(not np.allclose(a, b) for a, b in zip(before, plain.get_weights(), strict=True))


@pytest.mark.parametrize("labels", [np.eye(7, dtype=np.float32)[[0, 1]],
                                    np.array([0.5, 1.5], np.float32)])
def test_labels_of_the_wrong_shape_raise(labels):
    model = _small()
    model.compile()
    dataset = tf.data.Dataset.from_tensors((_images(2), labels))
    with pytest.raises(ValueError, match="labels"):
        model.fit(dataset, verbose=0)


@pytest.mark.slow
def test_keras_save_and_load_give_identical_logits(tmp_path):
    model = _small(leaky=True)
    model.compile()
    images = _images(3)
    path = str(tmp_path / "capsnet.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compiled, never trained: no optimizer mismatch either
        loaded = keras.models.load_model(path)
    assert isinstance(loaded, CapsNet) and loaded.hparams == model.hparams
    assert loaded.compiled
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())
    np.testing.assert_array_equal(loaded.reconstruct(images, [1, 2, 3]).numpy(),
                                  model.reconstruct(images, [1, 2, 3]).numpy())


def test_tf_checkpoint_round_trip(tmp_path):
    model, other = _small(), _small()
    images = _images(2)
    assert not np.allclose(other(images).numpy(), model(images).numpy())
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(other(images).numpy(), model(images).numpy())


@pytest.mark.slow
def test_baseline_trains_and_flattens_depth_major():
    model = ConvBaseline(default_hparams().replace(loss_type="softmax", padding="SAME"),
                         input_shape=(12, 12, 2), num_classes=3)
    images = _images(4, (12, 12, 2))
    assert model(images).shape == (4, 3)
    model.compile()
    history = model.fit(tf.data.Dataset.from_tensors((images, np.array([0, 1, 2, 0]))),
                        epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    x = np.arange(2 * 2 * 3 * 2).reshape(2, 2, 3, 2)
    np.testing.assert_array_equal(flatten_depth_major(x).numpy(),
                                  np.transpose(x, (0, 3, 1, 2)).reshape(2, -1))


def test_bad_model_arguments_raise():
    with pytest.raises(ValueError, match="input_shape"):
        CapsNet(input_shape=(28, 28))
    with pytest.raises(ValueError, match="num_targets"):
        CapsNet(num_targets=3)
    with pytest.raises(ValueError, match="remake"):
        CapsNet(default_hparams().replace(remake=False)).reconstruct(_images(1, (28, 28, 1)), [0])


@pytest.fixture
def mixed_bfloat16():
    """Keras' 'mixed_bfloat16' global policy for the models built in the test."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("leaky", [False, True])
def test_mixed_bfloat16_routes_in_float32_close_to_float32(leaky, mixed_bfloat16):
    mixed = _small(leaky=leaky)
    keras.mixed_precision.set_global_policy("float32")
    plain = _small(leaky=leaky)
    plain.set_weights(mixed.get_weights())
    images = _images(8, seed=5)
    assert all(w.dtype == "float32" for w in mixed.weights)
    hidden = mixed.conv1(images)
    primary = mixed.primary_capsules(hidden)
    # bfloat16 convolutions; routing, capsules and logits in float32.
    assert (hidden.dtype, primary.dtype) == (tf.bfloat16, tf.float32)
    assert mixed.class_capsules(primary).dtype == tf.float32
    logits, expected = mixed(images), plain(images).numpy()
    assert logits.dtype == tf.float32
    # bfloat16 keeps 8 bits of mantissa: relative errors near 2^-8 per product.
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=2e-2)
    assert not np.array_equal(logits.numpy(), expected)  # the convolutions did run in bf16


@pytest.mark.slow
def test_mixed_bfloat16_trains_and_shares_checkpoints_with_float32(tmp_path, mixed_bfloat16):
    keras.utils.set_random_seed(0)
    mixed = _small()
    mixed.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, labels = _images(16, seed=4), np.arange(16) % 5
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    history = mixed.fit(dataset, epochs=8, verbose=0).history["loss"]
    assert all(np.isfinite(history)) and history[-1] < history[0]
    path = tf.train.Checkpoint(model=mixed).save(str(tmp_path / "ckpt"))
    keras.mixed_precision.set_global_policy("float32")
    plain = _small()
    status = tf.train.Checkpoint(model=plain).restore(path)
    status.assert_existing_objects_matched().expect_partial()  # no optimizer here
    for ours, theirs in zip(plain.get_weights(), mixed.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def _fitted(model, steps=1):
    model.compile(optimizer=keras.optimizers.Adam(
        ReferenceDecay(1e-3, decay_steps=10, decay_rate=0.5), epsilon=1e-8))
    shape = model.image_shape
    dataset = tf.data.Dataset.from_tensors((_images(4, shape, seed=8), np.arange(4) % 3))
    model.fit(dataset.repeat(steps), verbose=0)
    return model, dataset


@pytest.mark.parametrize("make", [
    lambda: _small(),
    lambda: ConvBaseline(default_hparams().replace(padding="SAME"), input_shape=(12, 12, 1),
                         num_classes=3),
])
@pytest.mark.slow
def test_load_model_returns_it_compiled_and_fit_continues(make, tmp_path):
    model, dataset = _fitted(make())
    path = str(tmp_path / "model.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras.models.load_model(path)
    assert loaded.compiled and isinstance(loaded.optimizer, keras.optimizers.Adam)
    schedule = loaded.optimizer._learning_rate
    assert isinstance(schedule, ReferenceDecay)
    assert schedule.get_config() == model.optimizer._learning_rate.get_config()
    assert loaded.optimizer.epsilon == 1e-8
    # The optimizer's state (step count, Adam moments) comes back too.
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 1
    for ours, theirs in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(theirs.numpy(), ours.numpy())
    # Training continues without compile(), as the original would.
    before = loaded.get_weights()
    loaded.fit(dataset, verbose=0)
    model.fit(dataset, verbose=0)
    assert int(loaded.optimizer.iterations) == 2
    assert any(not np.allclose(a, b) for a, b in zip(before, loaded.get_weights(), strict=True))
    for ours, theirs in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("argument", [
    {"loss": "mse"}, {"metrics": ["accuracy"]}, {"loss_weights": [1.0]},
    {"weighted_metrics": ["accuracy"]},
])
def test_compile_rejects_loss_and_metrics(argument):
    model = _small()
    name = next(iter(argument))
    with pytest.raises(ValueError, match=rf"takes no {name}.*computes its own loss \(hparams"
                                         r"\.loss_type='margin' plus the reconstruction loss\)"
                                         r" and metrics \(loss, classification_loss"):
        model.compile(**argument)
    assert not model.compiled


def test_sample_weight_weights_the_per_example_losses():
    model = _small()
    images, labels = _images(4, seed=9), np.array([0, 2, 4, 1])
    weights = np.array([0.0, 1.0, 2.0, 0.5], np.float32)
    results = model.compute_losses((images, labels, weights))
    costs = ref.margin_costs(np.eye(5)[labels], model(images).numpy().astype(np.float64))
    squared_error = np.sum(
        (model.reconstruct(images, labels).numpy() - images).reshape(4, -1) ** 2, axis=1)
    # Keras' reduction: sum of weight x loss over the batch size.
    np.testing.assert_allclose(results["classification_loss"].numpy(),
                               np.mean(weights * costs.mean(axis=1)), rtol=1e-5)
    np.testing.assert_allclose(results["reconstruction_loss"].numpy(),
                               0.0005 * np.mean(weights * squared_error), rtol=1e-5)
    unweighted = model.compute_losses((images, labels))["loss"].numpy()
    np.testing.assert_allclose(
        model.compute_losses((images, labels, np.ones([4, 1], np.float32)))["loss"].numpy(),
        unweighted, rtol=1e-6)


@pytest.mark.slow
def test_fit_with_zero_sample_weights_does_not_train():
    images, labels = _images(4, seed=10), np.arange(4)
    for weights, trains in ((np.zeros(4, np.float32), False), (np.ones(4, np.float32), True)):
        model = _small()
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        before = model.get_weights()
        model.fit(images, labels, sample_weight=weights, batch_size=4, verbose=0)
        changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(),
                                                              strict=True)]
        assert any(changed) == trains


def test_sample_weight_of_the_wrong_shape_raises():
    model = _small()
    model.compile()
    dataset = tf.data.Dataset.from_tensors((_images(2), np.arange(2), np.ones([2, 3])))
    with pytest.raises(ValueError, match=r"sample_weight must be one weight per image"):
        model.fit(dataset, verbose=0)


@pytest.mark.parametrize("make,full_precision", [
    (lambda dtype: CapsNet(default_hparams().replace(padding="SAME", num_prime_capsules=4),
                           input_shape=(12, 12, 1), num_classes=5, dtype=dtype),
     {"length", "recons", "recons_1", "recons_2", "recons_3"}),
    (lambda dtype: ConvBaseline(default_hparams().replace(padding="SAME"),
                                input_shape=(12, 12, 1), num_classes=5, dtype=dtype),
     {"softmax_layer"}),
    # EM routing runs in the variable dtype inside the capsule layers (test_em_layers.py).
    (lambda dtype: EMCapsNet(parse_overrides(EMHParams(), TINY_EM), input_shape=(20, 20, 1),
                             num_classes=5, dtype=dtype),
     set()),
])
@pytest.mark.parametrize("dtype,variables", [("mixed_bfloat16", "float32"),
                                             ("float64", "float64")])
def test_model_dtype_goes_to_every_sublayer(make, full_precision, dtype, variables):
    model = make(dtype)
    sublayers = list(model._flatten_layers(include_self=False))
    assert {layer.name for layer in sublayers} >= full_precision
    for layer in sublayers:
        want = variables if layer.name in full_precision else dtype
        assert layer.dtype_policy.name == want, layer.name
    assert all(weight.dtype == variables for weight in model.weights)
    results = model.compute_losses((_images(2, model.image_shape), np.arange(2)))
    assert results["logits"].dtype == variables and np.isfinite(results["loss"].numpy())
    clone = type(model).from_config(model.get_config())
    assert clone.dtype_policy.name == dtype


@pytest.mark.slow
def test_training_step_graph_routes_in_while_loops():
    model = _small()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    step = tf.function(model.optimize_step).get_concrete_function(
        (tf.TensorSpec([None, 12, 12, 1]), tf.TensorSpec([None], tf.int32)))
    loops = [op for op in step.graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(loops) == 2  # the class capsules' iterations, and their gradient's reverse pass
