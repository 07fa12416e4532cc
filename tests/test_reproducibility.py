"""The same seed, the same run, through experiment.py itself: two runs of one command, one
process against two local workers, and a run stopped and resumed against an unbroken one give
equal checkpoints (CapsNet and EMCapsNet; single-digit MNIST with random shifts, and MultiMNIST
made on the fly); `model.fit` after `keras.utils.set_random_seed` is as reproducible.

Equal means bit for bit, weights and optimizer state, where the steps compute the same sums in
the same order (two runs of one command, a resumed run). Where a step's batch is split over
workers its gradient sums add in another order: the weights are then equal to round-off (1e-5
of each variable's largest element) and the optimizer's step exactly (Adam's second moments,
squares of gradients that may be sums of cancelling terms, double the relative round-off).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsules.hparams import default_hparams, parse_overrides
from capsules.models import CapsNet
from input_data.mnist import mnist_shift
from input_data.mnist.record_names import record_name
from tests.test_input_mnist import digits, write_idx

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
TIMEOUT = 600
CAPSULE = "--hparams_override=num_prime_capsules=1,routing=1,remake=false"
EM = ("--model=em", "--hparams_override=conv1_channels=8,primary_capsules=2,conv_capsules1=2,"
      "conv_capsules2=2,routing=2")
MULTIMNIST = ("--dataset=multimnist", "--num_targets=2")
ROUND_OFF = 1e-5  # of each variable's largest element

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """MNIST IDX files of 40 + 10 random 'digits' and the unshifted training records of the
    40 (what --random_shift reads)."""
    data_dir = tmp_path_factory.mktemp("mnist")
    train, labels = digits(40, seed=1), np.arange(40, dtype=np.uint8) % 10
    write_idx(data_dir, (train, labels), (digits(10, seed=2), np.arange(10, dtype=np.uint8)))
    mnist_shift.write_single(train, labels, str(data_dir / record_name("train", 0)), 0, 0)
    return str(data_dir)


def train(data: str, run: Path, *args: str) -> None:
    """`python experiment.py` training at batch 8 with seed 7 into `run`, finished."""
    result = subprocess.run(
        [sys.executable, "experiment.py", f"--data_dir={data}", f"--summary_dir={run}",
         "--batch_size=8", "--seed=7", "--save_step=1", "--keep_checkpoints=0", *args],
        cwd=ROOT, env=dict(ENV, TMPDIR=str(run.parent)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-4000:]


def variables(run: Path, step: int, optimizer: bool = True) -> dict[str, np.ndarray]:
    """The variables of the checkpoint at `step`: the weights, and the optimizer's state
    (all of it, or its step alone)."""
    reader = tf.train.load_checkpoint(str(run / "train" / f"model.ckpt-{step}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/") and (optimizer or "optimizer/_variables" not in name)}


def assert_equal_runs(got: Path, expected: Path, step: int, exact: bool) -> None:
    got_vars, expected_vars = variables(got, step, exact), variables(expected, step, exact)
    assert got_vars.keys() == expected_vars.keys() and len(got_vars) > 4
    for name, value in expected_vars.items():
        if exact or "optimizer" in name:
            np.testing.assert_array_equal(got_vars[name], value, err_msg=name)
        else:
            scale = float(np.max(np.abs(value))) if np.size(value) else 0.0
            np.testing.assert_allclose(got_vars[name], value, rtol=0,
                                       atol=ROUND_OFF * max(scale, 1e-30), err_msg=name)


def assert_moved(run: Path, step: int) -> None:
    """Training changed the weights (else equal checkpoints would prove nothing)."""
    start, end = variables(run, 1), variables(run, step)
    kernels = [name for name in start if "kernel" in name and "optimizer" not in name]
    assert kernels and all(not np.array_equal(start[n], end[n]) for n in kernels)


def test_two_runs_of_one_command_give_equal_checkpoints(data, tmp_path):
    # (EMCapsNet's runs are compared bit for bit by the resume test below.)
    for name in ("a", "b"):
        train(data, tmp_path / name, "--max_steps=2", CAPSULE, "--random_shift=2")
    assert_moved(tmp_path / "a", 2)
    assert_equal_runs(tmp_path / "b", tmp_path / "a", 1, exact=True)
    assert_equal_runs(tmp_path / "b", tmp_path / "a", 2, exact=True)


@pytest.mark.parametrize("model", [(CAPSULE, "--random_shift=2"), (*EM, "--random_shift=2"),
                                   (*MULTIMNIST, CAPSULE)],
                         ids=["capsnet", "emcapsnet", "multimnist"])
def test_a_run_stopped_and_resumed_equals_an_unbroken_one(data, tmp_path, model):
    train(data, tmp_path / "unbroken", "--max_steps=4", *model)
    train(data, tmp_path / "resumed", "--max_steps=2", *model)
    train(data, tmp_path / "resumed", "--max_steps=4", *model)
    assert_moved(tmp_path / "unbroken", 4)
    assert_equal_runs(tmp_path / "resumed", tmp_path / "unbroken", 4, exact=True)


@pytest.mark.parametrize("model", [(CAPSULE, "--random_shift=2"), (*MULTIMNIST, CAPSULE),
                                   (*EM, "--random_shift=2")],
                         ids=["capsnet", "multimnist", "emcapsnet"])
def test_one_process_and_two_local_workers_give_equal_checkpoints(data, tmp_path, model):
    train(data, tmp_path / "one", "--max_steps=3", *model)
    train(data, tmp_path / "two", "--max_steps=3", "--local_workers=2", *model)
    assert_moved(tmp_path / "one", 3)
    assert_equal_runs(tmp_path / "two", tmp_path / "one", 1, exact=False)
    assert_equal_runs(tmp_path / "two", tmp_path / "one", 3, exact=False)


def test_fit_after_set_random_seed_is_reproducible():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(16, 28, 28, 1)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(16) % 10, 10)
    hparams = parse_overrides(default_hparams(), "num_prime_capsules=1,routing=1")

    def fitted() -> list[np.ndarray]:
        keras.utils.set_random_seed(5)
        model = CapsNet(hparams)
        model.compile()
        model.fit(images, labels, batch_size=4, epochs=2, shuffle=True, verbose=0)
        return model.get_weights()

    def initial() -> list[np.ndarray]:
        keras.utils.set_random_seed(5)
        model = CapsNet(hparams)
        model(images[:1])
        return model.get_weights()

    first, second = fitted(), fitted()
    assert any(np.any(a != b) for a, b in zip(first, initial(), strict=True))  # it trained
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
