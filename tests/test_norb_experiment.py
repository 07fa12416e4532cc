"""experiment.py on smallNORB: NYU files converted by `input_data.norb.convert`, a few
training steps, and testing with and without the official test-time crops (--patching)."""

from __future__ import annotations

import numpy as np
import pytest
from absl import flags

import input_data
from capsules import evaluation, experiment
from capsules.checkpoints import load_model
from input_data.norb import convert, nyu
from tests.test_experiment import SMALL, report, run

NUM_TEST = 5
EM_TINY = "conv1_channels=4,primary_capsules=2,conv_capsules1=2,conv_capsules2=2,routing=1"


@pytest.fixture(scope="module")
def norb_dir(tmp_path_factory):
    """Converted records of 6 training and NUM_TEST test pairs."""
    root = tmp_path_factory.mktemp("norb")
    (root / "nyu").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", NUM_TEST)):
        arrays = {"dat": rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8),
                  "cat": np.arange(n, dtype=np.int32) % 5,
                  "info": rng.integers(0, 9, (n, 4)).astype(np.int32)}
        for kind, array in arrays.items():
            (root / "nyu" / nyu.file_name(split, kind)).write_bytes(nyu.encode(array))
    convert.convert(str(root / "nyu"), str(root / "records"))
    return root / "records"


@pytest.mark.slow
@pytest.mark.parametrize("model, hparams", [("capsule", SMALL), ("em", EM_TINY)])
def test_norb_trains_and_tests_with_and_without_patching(norb_dir, tmp_path, model, hparams):
    run(f"--data_dir={norb_dir}", "--dataset=norb", f"--model={model}",
        f"--summary_dir={tmp_path}", "--max_steps=2", "--batch_size=2",
        f"--hparams_override={hparams}")
    checkpoint = str(tmp_path / "train" / "model.ckpt-2")
    args = [f"--data_dir={norb_dir}", "--dataset=norb", f"--model={model}", "--train=false",
            f"--checkpoint={checkpoint}", f"--eval_size={NUM_TEST}"]
    central, _ = run(*args)
    patched, stdout = run(*args, "--patching")
    assert central.total == patched.total == report(stdout)["total"] == NUM_TEST
    # The same vote computed here, from the crops and the restored model.
    crops = input_data.inputs("norb", "test", str(norb_dir), NUM_TEST, patching=True)
    logits, labels = evaluation.collect_logits(load_model(checkpoint), crops, NUM_TEST)
    assert patched == evaluation.score(logits, labels, 1)


def test_patching_outside_norb_is_a_flag_error():
    with pytest.raises(flags.IllegalFlagValueError,
                       match="--patching: the test-time crops are defined for --dataset=norb"):
        experiment.parse_config(["--patching", "--dataset=mnist"])
    assert experiment.parse_config(["--patching", "--dataset=norb"]).patching
