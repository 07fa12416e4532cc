"""The commands print their results, not TensorFlow's C++ logs (unless TF_CPP_MIN_LOG_LEVEL asks).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capsules import tf_logs
from input_data.mnist import mnist_shift
from input_data.mnist.record_names import record_name

ROOT = Path(__file__).resolve().parents[1]
# The lines TensorFlow 2.21 prints on import and on its first op, and any absl log line.
LOG_LINE = re.compile(r"^[IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog|"
                      r"oneDNN custom operations|Could not find cuda drivers|cuInit|"
                      r"cpu_feature_guard|rebuild TensorFlow with the appropriate compiler")
NOTICE = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
          "STDERR")
INFO = ("I0000 00:00:1796575883.573464    3597 port.cc:153] oneDNN custom operations are on.")
ERROR = ("E0000 00:00:1796575886.235493    3597 cuda_platform.cc:52] failed call to cuInit: "
         "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
WARNING = "W1105 12:01:02.123456  123 gpu_device.cc:2344] Cannot dlopen some GPU libraries."


@pytest.mark.parametrize("level, held", [
    (0, []), (1, [NOTICE, INFO]), (2, [NOTICE, INFO, WARNING]), (3, [NOTICE, INFO, WARNING, ERROR]),
])
def test_log_lines_below_the_level_are_held_back(level, held):
    lines = [NOTICE, INFO, WARNING, ERROR, "fetch: error: data/mnist not found",
             "<string>:7: UserWarning: I0000 is not at the start", "W0rd 12:00 not a log line"]
    assert [line for line in lines if tf_logs.held_back(line, level)] == held


def test_what_is_written_to_file_descriptor_2_comes_back_without_the_log_lines(capfd):
    with tf_logs._stderr_filtered(3):
        os.write(2, f"{NOTICE}\nbefore\n{INFO}\n".encode())
        os.write(2, f"{ERROR}\nafter\n".encode())
    assert capfd.readouterr().err == "before\nafter\n"


def test_what_was_written_comes_back_when_the_block_fails(capfd):
    with pytest.raises(ImportError), tf_logs._stderr_filtered(3):
        os.write(2, f"{INFO}\nimport failed part way\n".encode())
        raise ImportError("no module named tensorflow")
    assert capfd.readouterr().err == "import failed part way\n"


@pytest.mark.parametrize("value, level", [(None, 0), ("3", 3), ("1", 1), ("x", 0)])
def test_log_level_reads_the_variable(monkeypatch, value, level):
    if value is None:
        monkeypatch.delenv(tf_logs.LEVEL_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(tf_logs.LEVEL_VARIABLE, value)
    assert tf_logs.log_level() == level


def _command(args: list[str], level: str | None) -> subprocess.CompletedProcess:
    """Runs `python ARGS` in the repository root with TF_CPP_MIN_LOG_LEVEL unset or `level`."""
    env = {key: value for key, value in os.environ.items() if key != tf_logs.LEVEL_VARIABLE}
    if level is not None:
        env[tf_logs.LEVEL_VARIABLE] = level
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


# Each command, stopped by a usage error after importing TensorFlow (experiment.py after
# loading the shipped model, so on a machine with a GPU driver after making the device).
COMMANDS = {
    "experiment.py": ["experiment.py", "--train=false", "--checkpoint=checkpoints/mnist",
                      "--data_dir={tmp}"],
    "capsules.experiment": ["-m", "capsules.experiment", "--train=false"],
    "fetch": ["-m", "input_data.mnist.fetch", "--data_dir={tmp}", "--source=local"],
    "mnist_shift": ["input_data/mnist/mnist_shift.py", "--data_dir={tmp}", "--split=test",
                    "--shift=0"],
    "norb_convert": ["-m", "input_data.norb.convert", "--nyu_dir={tmp}", "--data_dir={tmp}"],
    "visualize": ["-m", "capsules.visualize", "--checkpoint={tmp}/x", "--output_dir={tmp}"],
    "export": ["-m", "capsules.export", "--checkpoint={tmp}/x", "--output_dir={tmp}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_print_no_tensorflow_log_lines_unless_asked(tmp_path, name):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in COMMANDS[name]]
    quiet = _command(args, None)
    assert quiet.returncode == 1, quiet.stderr[-3000:]
    assert "Traceback" not in quiet.stderr, quiet.stderr[-3000:]
    lines = quiet.stderr.splitlines()
    assert lines and not [line for line in lines if LOG_LINE.search(line)], quiet.stderr
    if name == "experiment.py":
        # TF_CPP_MIN_LOG_LEVEL=0 gives back TensorFlow's lines, and nothing else differs (one
        # filter serves every command; checked on one).
        loud = _command(args, "0")
        assert [line for line in loud.stderr.splitlines() if not LOG_LINE.search(line)] == lines


@pytest.mark.slow
def test_training_prints_no_log_line_when_it_saves_a_checkpoint(tmp_path):
    # TensorFlow's saver logs a Python INFO line per save ("Sharding callback duration").
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    mnist_shift.write_single(pixels, np.arange(4), str(tmp_path / record_name("train", 2)),
                             0, 0)
    result = _command(["experiment.py", f"--data_dir={tmp_path}", f"--summary_dir={tmp_path}",
                       "--batch_size=4", "--max_steps=1",
                       "--hparams_override=num_prime_capsules=1,routing=1,remake=false"], None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "train" / "model.ckpt-1.index").exists()
    output = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
    assert not [line for line in output if LOG_LINE.search(line)], output
