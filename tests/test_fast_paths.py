"""The package's CapsNet computes what the reference's formulation computes (no timing).

`benchmarks/throughput.py` times CapsNet against `ReferenceCapsNet`, the same
network with the reference's votes (tile + multiply + reduce_sum) and routing
(transposes, tiling, a TensorArray). Its speed ratios mean something only if
both compute the same function: checked here on the same weights.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from capsules import CapsNet, default_hparams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import ReferenceCapsNet, forward_flops  # noqa: E402

_ROUTING_CASES = [(1, False), (1, True), (3, False), (3, True)]


def _twin_models(routing, leaky, remake=False):
    hparams = default_hparams().replace(routing=routing, leaky=leaky, remake=remake)
    package = CapsNet(hparams)
    reference = ReferenceCapsNet(hparams)
    reference.set_weights(package.get_weights())
    return package, reference


def _images(n=3, seed=0):
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


@pytest.mark.parametrize("routing,leaky", _ROUTING_CASES)
@pytest.mark.slow
def test_reference_formulation_gives_the_package_logits(routing, leaky):
    package, reference = _twin_models(routing, leaky)
    images = _images()
    expected = package(images).numpy()
    np.testing.assert_allclose(reference(images).numpy(), expected, rtol=0, atol=1e-5)
    # The same inside tf.function, the way fit and predict run them.
    np.testing.assert_allclose(tf.function(reference)(images).numpy(), expected, rtol=0,
                               atol=1e-5)


@pytest.mark.slow
def test_reference_formulation_gives_the_package_class_capsules_and_gradients():
    package, reference = _twin_models(3, False, remake=True)
    images, labels = _images(2, seed=1), np.array([3, 7], np.int32)
    np.testing.assert_allclose(reference.class_capsule_outputs(images).numpy(),
                               package.class_capsule_outputs(images).numpy(), rtol=0, atol=1e-5)
    gradients = []
    for model in (package, reference):
        with tf.GradientTape() as tape:
            loss = model.compute_losses((images, labels), training=True)["loss"]
        gradients.append(tape.gradient(loss, model.trainable_variables))
    for ours, theirs in zip(*gradients, strict=True):
        scale = float(tf.reduce_max(tf.abs(ours))) + 1e-12
        np.testing.assert_allclose(theirs.numpy() / scale, ours.numpy() / scale, rtol=0,
                                   atol=1e-4)


def test_reference_formulation_shares_the_package_variables():
    package, reference = _twin_models(3, False, remake=True)
    assert [v.shape for v in reference.weights] == [v.shape for v in package.weights]
    assert reference.count_params() == package.count_params()


def test_flops_counted_from_the_layer_shapes():
    flops = forward_flops(CapsNet(default_hparams()))
    # conv1 20x20x256 outputs of 9x9x1 taps; primary capsules 6x6x256 of 9x9x256;
    # votes 1152x8 -> 10x16; routing 3 weighted sums + 2 agreements of 1152x160;
    # decoder 160-512-1024-784.
    assert flops == {
        "conv1": 2 * 20 * 20 * 256 * 81,
        "primary": 2 * 6 * 6 * 256 * 81 * 256,
        "votes": 2 * 1152 * 8 * 160,
        "routing": 2 * 1152 * 160 * 5,
        "decoder": 2 * (160 * 512 + 512 * 1024 + 1024 * 784),
    }


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_capsule_ops_benchmark_runs_and_its_pairs_agree(dtype, tolerance):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "capsule_ops.py"
    result = subprocess.run([sys.executable, str(script), "--batch_sizes=3", "--repeats=1",
                             f"--dtype={dtype}"],
                            capture_output=True, text=True, timeout=300, check=True)
    rows = [line.split() for line in result.stdout.splitlines()
            if line.startswith(("primary", "conv1", "routing"))]
    # primary: forward, + kernel grad, + both grads; conv1: forward, + kernel grad; routing: 2.
    assert [row[0] for row in rows] == ["primary"] * 3 + ["conv1"] * 2 + ["routing"] * 2
    for row in rows:
        package_ms, plain_ms, max_rel_diff = float(row[-4]), float(row[-3]), float(row[-1])
        assert package_ms > 0 and plain_ms > 0
        # The routing runs in float32 under either dtype, as under mixed_bfloat16.
        assert max_rel_diff < (1e-4 if row[0] == "routing" else tolerance), row
