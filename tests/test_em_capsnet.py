"""EMCapsNet: parameter counts, the spread loss and its margin, saving, training, experiment.py."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsules import em_layers, em_routing, losses, parse_overrides
from capsules.em_hparams import EMHParams
from capsules.errors import UsageError
from capsules.models import MODELS, EMCapsNet
from tests.em_reference_tf import plain_logits

ROOT = Path(__file__).resolve().parents[1]
TINY = "conv1_channels=4,primary_capsules=3,conv_capsules1=3,conv_capsules2=3,routing=2"


def _tiny(dtype=None, preset=None, **changes):
    """A 20x20x1 EMCapsNet (8x8 -> 3x3 -> 1x1 capsule grids) of 3-type layers."""
    hparams = EMHParams.preset(preset) if preset else EMHParams()
    return EMCapsNet(parse_overrides(hparams, TINY).replace(**changes),
                     input_shape=(20, 20, 1), num_classes=4, dtype=dtype)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 20, 20, 1)).astype(np.float32), rng.integers(0, 4, n)


@pytest.mark.parametrize("input_shape,num_classes,expected",
                         [((32, 32, 2), 5, 316_650), ((32, 32, 1), 5, 315_850),
                          ((28, 28, 1), 10, 318_420)])
def test_parameter_count_is_the_official_models(input_shape, num_classes, expected):
    # conv1 5*5*depth*32 + 32, primary 32 * (512 + 32), two conv capsule layers
    # 3*3*32*32*16 + 64 each, class capsules 32 * classes * 16 + 2 * classes.
    model = EMCapsNet(EMHParams.preset("smallnorb_official"), input_shape=input_shape,
                      num_classes=num_classes)
    assert model.count_params() == expected
    assert EMCapsNet(input_shape=input_shape, num_classes=num_classes).count_params() == expected
    # Batch normalisation after conv1 adds 4 weights per channel and drops conv1's bias.
    assert EMCapsNet(EMHParams(conv1_batch_norm=True), input_shape=input_shape,
                     num_classes=num_classes).count_params() == expected + 3 * 32
    assert (5 * 5 * input_shape[2] * 32 + 32) + 32 * 544 + 2 * (9 * 32 * 32 * 16 + 64) + (
        32 * num_classes * 16 + 2 * num_classes) == expected


def test_registered_for_experiment_and_the_defaults():
    assert MODELS["em"] is EMCapsNet and EMCapsNet.hparams_class is EMHParams
    model = EMCapsNet()
    assert model.hparams == EMHParams()
    assert (model.image_shape, model.num_classes) == ((32, 32, 2), 5)
    with pytest.raises(ValueError, match="hparams of EMCapsNet must be"):
        EMCapsNet(hparams=MODELS["capsule"].hparams_class())
    with pytest.raises(ValueError, match="unknown hparam 'routing_iterations'"):
        parse_overrides(EMHParams(), "routing_iterations=2")
    with pytest.raises(ValueError, match="margin_start=0.95, margin_end=0.9"):
        EMHParams(margin_start=0.95)


def test_presets_and_the_official_values():
    official = EMHParams.preset("smallnorb_official")
    # Every departure of the defaults switches off to the official value.
    assert (official.routing, official.variance_floor, official.class_cost_scale,
            official.conv_kernel_stddev, official.class_kernel_stddev,
            official.conv1_batch_norm, official.ema_momentum) == (
        3, em_routing.VARIANCE_FLOOR, 1.0, 0.3, 0.01, False, 0.0)
    departures = {name for name, value in EMHParams().to_dict().items()
                  if value != official.to_dict()[name]}
    assert departures == {"routing", "variance_floor", "conv_kernel_stddev",
                          "class_kernel_stddev", "ema_momentum"} | (
        {"class_cost_scale"} if EMHParams().class_cost_scale != 1.0 else set())
    model = EMCapsNet(official)
    model.compile()
    assert not model.optimizer.use_ema
    routed = [model.conv_capsules1, model.conv_capsules2, model.class_capsules]
    assert [layer.variance_floor for layer in routed] == [em_routing.VARIANCE_FLOOR] * 3
    assert [layer.cost_scale for layer in routed] == [1.0] * 3
    # The layers' own "official" initial scales.
    assert [layer.kernel_initializer.stddev for layer in routed] == [
        em_layers.ConvMatrixCapsule._KERNEL_STDDEV] * 2 + [
        em_layers.ClassMatrixCapsule._KERNEL_STDDEV]
    assert model.conv1_norm is None
    # Each layer draws its own initial kernel (one initializer draws the same values twice).
    for hparams in (official, EMHParams()):
        model = EMCapsNet(hparams)
        first = model.conv_capsules1.kernel.numpy().ravel()
        second = model.conv_capsules2.kernel.numpy().ravel()
        assert np.mean(first == second[:first.size]) < 0.01

    small = parse_overrides(EMHParams(), "routing=3,preset=mnist_small")  # preset first
    assert small == EMHParams.preset("mnist_small").replace(routing=3)
    assert (small.conv1_channels, small.primary_capsules, small.conv_capsules1,
            small.conv_capsules2) == (64, 8, 16, 16)
    with pytest.raises(ValueError, match="preset='norb': unknown preset; EMHParams has: "
                                         "smallnorb_official, mnist_small"):
        parse_overrides(EMHParams(), "preset=norb")


def test_batch_norm_after_conv1():
    model = _tiny(conv1_batch_norm=True)
    images, labels = _batch(4)
    assert model.conv1.activation is keras.activations.linear
    model.compile()
    moving_mean = model.conv1_norm.moving_mean.numpy().copy()
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert not np.allclose(model.conv1_norm.moving_mean.numpy(), moving_mean)
    np.testing.assert_allclose(plain_logits(model, images), model(images), rtol=1e-5,
                               atol=1e-6)


def test_spread_loss_matches_its_definition():
    rng = np.random.default_rng(1)
    activations = rng.random((6, 5)).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 6)]
    expected = []
    for a, y in zip(activations, labels, strict=True):
        target = a[y.argmax()]
        expected.append(sum(max(0.0, 0.4 - (target - a[i])) ** 2
                            for i in range(5) if not y[i]))
    got = losses.spread_loss(labels, activations, 0.4).numpy()
    np.testing.assert_allclose(got, np.mean(expected) / 5, rtol=1e-5)
    # Sample weights scale each image's loss; the mean is still over the batch size.
    weights = np.array([2.0, 0, 0, 0, 0, 1.0], np.float32)
    weighted = losses.spread_loss(labels, activations, 0.4, weights).numpy()
    np.testing.assert_allclose(weighted, (2 * expected[0] + expected[5]) / 6 / 5, rtol=1e-5)
    # Two targets: each is paired with every unlabelled class.
    two = labels.copy()
    two[:, 0] = 1.0
    assert losses.spread_loss(two, activations, 0.4).numpy() >= 0.0


def test_margin_rises_linearly_then_stays():
    model = _tiny(margin_steps=10)
    assert float(model.margin()) == pytest.approx(0.9)  # not compiled: the final margin
    model.compile()
    for step, expected in [(0, 0.2), (5, 0.55), (10, 0.9), (50, 0.9)]:
        model.optimizer.iterations.assign(step)
        assert float(model.margin()) == pytest.approx(expected)


def test_weight_decay_is_on_the_kernels_only():
    model = _tiny(weight_decay=1.0)
    images, labels = _batch(2)
    with_decay = model.compute_losses((images, labels))
    expected = sum(0.5 * np.sum(w.numpy() ** 2) for w in model.kernels)
    np.testing.assert_allclose(with_decay["loss"] - with_decay["classification_loss"],
                               expected, rtol=1e-5)
    assert len(model.kernels) == 6 and all("kernel" in w.path for w in model.kernels)


def test_config_and_keras_round_trips(tmp_path):
    model = _tiny()
    images, _ = _batch(2)
    clone = EMCapsNet.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    path = str(tmp_path / "em.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, EMCapsNet) and loaded.hparams == model.hparams
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_fit_lowers_the_spread_loss_without_nan(dtype):
    # The defaults: the recipe (docs/em_routing.md).
    keras.utils.set_random_seed(0)
    model = _tiny(dtype, margin_start=0.9)  # a fixed margin: losses comparable across steps
    model.compile()
    images, labels = _batch(16)
    before = float(model.compute_losses((images, labels))["classification_loss"])
    history = model.fit(images, labels, batch_size=16, epochs=8, verbose=0)
    losses_seen = history.history["classification_loss"]
    assert all(np.isfinite(losses_seen))
    after = float(model.compute_losses((images, labels))["classification_loss"])
    assert after < before
    assert set(history.history) == {"loss", "classification_loss", "accuracy"}


def test_evaluation_takes_the_moving_average_of_the_weights(tmp_path):
    from capsules import checkpoints, export

    model = _tiny(ema_momentum=0.5)
    model.compile()
    images, labels = _batch(8)
    trained = []
    for _ in range(3):
        model.optimize_step((images, labels))
        trained.append([w.numpy() for w in model.trainable_weights])
    # The first step's weights, then average = 0.5 average + 0.5 weights after each step.
    average = [0.25 * a + 0.25 * b + 0.5 * c for a, b, c in zip(*trained, strict=True)]
    directory = tmp_path / "train"
    prefix = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(directory), 1,
                                       checkpoint_name="model.ckpt").save(3)
    checkpoints.write_run_file(str(directory), model)

    def assert_weights(loaded, expected):
        for weight, value in zip(loaded.trainable_weights, expected, strict=True):
            np.testing.assert_allclose(weight.numpy(), value, rtol=1e-6, atol=1e-7,
                                       err_msg=weight.path)

    assert_weights(checkpoints.load_model(prefix), average)
    # Training resumes from the weights themselves; ema_momentum=0 evaluates them.
    assert_weights(model, trained[-1])
    assert_weights(checkpoints.load_model(prefix, "ema_momentum=0"), trained[-1])
    # An export holds the average and loads as it is.
    exported = export.export_weights(prefix, str(tmp_path / "export"))
    assert not checkpoints.has_optimizer_state(exported)
    assert_weights(checkpoints.load_model(exported), average)

    # A run file written before the field existed: its run trained without an average.
    content = json.loads((directory / checkpoints.RUN_FILE).read_text())
    del content["hparams"]["ema_momentum"]
    (directory / checkpoints.RUN_FILE).write_text(json.dumps(content))
    assert checkpoints.read_run_file(prefix).hparams.ema_momentum == 0.0
    assert EMCapsNet.from_config({**model.get_config(), "hparams": content["hparams"]}
                                 ).hparams.ema_momentum == 0.0
    plain = _tiny(ema_momentum=0.0)
    plain.compile()
    plain_prefix = tf.train.Checkpoint(model=plain).save(str(tmp_path / "plain" / "model.ckpt"))
    checkpoints.write_run_file(str(tmp_path / "plain"), plain)
    with pytest.raises(UsageError, match="loads with hparams_override='ema_momentum=0'"):
        checkpoints.load_model(plain_prefix, "ema_momentum=0.9")
    with pytest.raises(ValueError, match="ema_momentum=1.0: expected 0 <= ema_momentum < 1"):
        EMHParams(ema_momentum=1.0)


def _gradients(model, forward, images, labels):
    with tf.GradientTape() as tape:
        loss = losses.spread_loss(np.eye(4)[labels], forward(images), 0.2)
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def test_gradients_are_autodiff_of_the_plain_formulation_in_float64():
    # The whole model: votes, routing (its gradient written out, votes routed relative to
    # their mean) and the mass's epsilon, against tests/em_reference_tf.py.
    keras.utils.set_random_seed(3)
    model = _tiny(dtype="float64")
    images, labels = _batch(8, seed=3)
    got = _gradients(model, model, images.astype(np.float64), labels)
    want = _gradients(model, lambda x: plain_logits(model, x), images.astype(np.float64), labels)
    for variable, g, w in zip(model.trainable_variables, got, want, strict=True):
        assert np.abs(w).max() > 0, variable.path
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-7 * np.abs(w).max(), err_msg=variable.path)


def test_float32_gradients_keep_their_precision():
    # At the official initial values on noise images the early layers' gradients are
    # ~1e-10 against 2e-2 for the class beta_a; routed sums of raw [V, V^2] then lost the
    # betas' gradients entirely in float32 (errors several times their size).
    keras.utils.set_random_seed(3)
    model, model64 = _tiny(preset="smallnorb_official"), _tiny(
        dtype="float64", preset="smallnorb_official")
    for weight, weight64 in zip(model.weights, model64.weights, strict=True):
        weight64.assign(weight.numpy().astype(np.float64))
    images = np.random.default_rng(3).random((8, 20, 20, 1))
    labels = np.random.default_rng(4).integers(0, 4, 8)
    got = _gradients(model, model, images.astype(np.float32), labels)
    want = _gradients(model64, model64, images, labels)
    for variable, g, w in zip(model.trainable_variables, got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=0.1 * np.abs(w).max(),
                                   err_msg=variable.path)


@pytest.mark.slow
def test_a_preset_round_trips_through_the_run_file(tmp_path):
    from input_data.mnist import mnist_shift
    from input_data.mnist.record_names import record_name
    from tests.test_input_mnist import digits

    mnist_shift.write_single(digits(8, seed=1), np.arange(8) % 10,
                             str(tmp_path / record_name("train", 0)), 0, 0)
    override = f"preset=smallnorb_official,{TINY}"
    result = subprocess.run(
        [sys.executable, "experiment.py", "--model=em", f"--data_dir={tmp_path}",
         f"--summary_dir={tmp_path / 'run'}", "--random_shift=2", "--batch_size=4",
         "--max_steps=1", f"--hparams_override={override}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from capsules.checkpoints import load_model

    model = load_model(str(tmp_path / "run" / "train" / "model.ckpt-1"))
    assert model.hparams == parse_overrides(EMHParams(), override)
    assert model.hparams.variance_floor == em_routing.VARIANCE_FLOOR != EMHParams().variance_floor
