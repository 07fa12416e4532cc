"""The same seed, the same run, through experiment.py itself: two processes from one seed, a
run stopped and resumed against an unbroken one, and two local workers against one process give
equal checkpoints (CapsNet and EMCapsNet; single-digit MNIST with random shifts, and MultiMNIST
made on the fly); `model.fit` after `keras.utils.set_random_seed` is as reproducible. Each
model's unbroken run is made once and compared with the others.

Equal means bit for bit, weights and optimizer state, where the steps compute the same sums in
the same order (two processes, a resumed run). Where a step's batch is split over
workers its gradient sums add in another order, and the optimizer's step is then compared
exactly and each variable's weights to round-off, in root mean square over its elements:
1e-5 of its largest element, plus, for a weight Adam trains, 1e-2 of the farthest Adam can
move it in those steps (about the learning rate a step). That second term is there because
Adam divides a gradient by its own root mean square: an element whose gradient is a sum of
cancelling terms near Adam's epsilon keeps its relative round-off in the step it makes,
whatever the weight's size. A worker that read other images or missed an update moves most
weights by a good part of a step, a hundred times more.

EMCapsNet runs here with batch normalisation after conv1, which makes many such elements
(the loss no longer sees conv1's scale); at the tiny model's small loss the round-off of
step 1 (median relative difference 1e-7, a few conv1 elements 1e-2) then grows 5 to 20 times
a step. Its two workers are compared at step 1, where an unsynchronized norm is off by up to
1,000 times the bound. The norm's moving statistics, which Adam does not train, are held to
the first term.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

from capsules.em_hparams import EMHParams
from capsules.hparams import HParams, default_hparams, parse_overrides
from capsules.models import CapsNet
from input_data.mnist import mnist_shift
from input_data.mnist.record_names import record_name
from tests.test_input_mnist import digits, write_idx

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
TIMEOUT = 600
CAPSULE = "--hparams_override=num_prime_capsules=1,routing=1,remake=false"
# With batch normalisation after conv1: its statistics are the part of EMCapsNet that workers
# must share (synchronized); the rest is covered as well with it as without.
EM = ("--model=em", "--hparams_override=conv1_channels=8,primary_capsules=2,conv_capsules1=2,"
      "conv_capsules2=2,routing=2,conv1_batch_norm=true")
MULTIMNIST = ("--dataset=multimnist", "--num_targets=2")
ROUND_OFF = 1e-5  # of each variable's largest element (root mean square difference)
STEP_ROUND_OFF = 1e-2  # of Adam's largest move, learning rate x steps (the same; trained)

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


def assert_equal_runs(got: Path, expected: Path, step: int,
                      learning_rate: float | None = None) -> None:
    """Bit for bit without a `learning_rate`; with one, to round-off as the module says."""
    exact = learning_rate is None
    got_vars, expected_vars = variables(got, step, exact), variables(expected, step, exact)
    assert got_vars.keys() == expected_vars.keys() and len(got_vars) > 4
    for name, value in expected_vars.items():
        if exact or "optimizer" in name:
            np.testing.assert_array_equal(got_vars[name], value, err_msg=name)
        elif np.size(value):
            scale = float(np.max(np.abs(value)))
            rms = float(np.sqrt(np.mean(np.square(got_vars[name] - value))))
            trained = "moving_" not in name  # not a batch norm's moving statistics
            assert rms <= ROUND_OFF * scale + trained * STEP_ROUND_OFF * learning_rate * step, (
                name, rms)


def assert_moved(run: Path, step: int) -> None:
    """Training changed the weights (else equal checkpoints would prove nothing)."""
    start, end = variables(run, 1), variables(run, step)
    kernels = [name for name in start if "kernel" in name and "optimizer" not in name]
    assert kernels and all(not np.array_equal(start[n], end[n]) for n in kernels)


class Model(NamedTuple):
    flags: tuple[str, ...]
    learning_rate: float  # Adam's
    worker_steps: tuple[int, ...] = (1, 3)  # where two workers match one process to round-off


MODELS = {"capsnet": Model((CAPSULE, "--random_shift=2"), HParams().learning_rate),
          "emcapsnet": Model((*EM, "--random_shift=2"), EMHParams().learning_rate, (1,)),
          "multimnist": Model((*MULTIMNIST, CAPSULE), HParams().learning_rate)}


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory):
    """unbroken(name): the run of MODELS[name] trained to step 4 in one process, made once."""
    runs = {}

    def run(name: str) -> Path:
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(f"unbroken_{name}")
            train(data, runs[name], "--max_steps=4", *MODELS[name].flags)
            assert_moved(runs[name], 4)
        return runs[name]

    return run


@pytest.mark.parametrize("name", ["capsnet", "emcapsnet", "multimnist"])
def test_a_run_stopped_and_resumed_equals_an_unbroken_one(data, tmp_path, unbroken, name):
    train(data, tmp_path / "resumed", "--max_steps=2", *MODELS[name].flags)
    # Two processes from one seed: equal at every step they both saved.
    assert_equal_runs(tmp_path / "resumed", unbroken(name), 1)
    assert_equal_runs(tmp_path / "resumed", unbroken(name), 2)
    train(data, tmp_path / "resumed", "--max_steps=4", *MODELS[name].flags)
    assert_equal_runs(tmp_path / "resumed", unbroken(name), 4)


# CapsNet's two workers against one process: tests/test_distribute.py.
@pytest.mark.parametrize("name", ["multimnist", "emcapsnet"])
def test_one_process_and_two_local_workers_give_equal_checkpoints(data, tmp_path, unbroken,
                                                                  name):
    model = MODELS[name]
    train(data, tmp_path / "two", f"--max_steps={model.worker_steps[-1]}", "--local_workers=2",
          *model.flags)
    for step in model.worker_steps:
        assert_equal_runs(tmp_path / "two", unbroken(name), step, model.learning_rate)


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
