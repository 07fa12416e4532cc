"""benchmarks/time_to_accuracy.py: training minutes to test accuracies from a run's summaries."""

import os
import subprocess
import sys
from pathlib import Path

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.time_to_accuracy import first_reaching, training_seconds  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_accuracy.py"


def test_training_seconds_counts_long_gaps_as_the_median_and_repeated_steps_again():
    # Steps 1-4 two seconds apart; a 1000 s stop; resumed from step 3 (3 and 4 trained again).
    times = [(0, 1), (2, 2), (4, 3), (6, 4), (1006, 3), (1009, 4), (1011, 5)]
    seconds = training_seconds(times, max_gap=60)
    # Intervals 2, 2, 2, 1000 -> median 2, 3, 2: the stop counts as 2 s.
    assert seconds == {1: 0, 2: 2, 3: 8, 4: 11, 5: 13}


def test_first_reaching_takes_the_earliest_step_at_or_above():
    accuracy = {3000: 99.31, 1000: 98.9, 2000: 99.30, 4000: 99.2}
    assert first_reaching(accuracy, 99.3) == 2000
    assert first_reaching(accuracy, 99.31) == 3000
    assert first_reaching(accuracy, 99.5) is None


def _write(directory, tag_values):
    writer = tf.summary.create_file_writer(str(directory))
    with writer.as_default():
        for step, values in tag_values:
            for tag, value in values.items():
                tf.summary.scalar(tag, value, step=step)
    writer.close()


def _run(summary_dir, *flags):
    return subprocess.run([sys.executable, str(SCRIPT), f"--summary_dir={summary_dir}", *flags],
                          capture_output=True, text=True, timeout=120)


def test_script_reports_the_first_checkpoint_reaching_each_threshold(tmp_path):
    _write(tmp_path / "train", [(step, {"loss": 1.0 / step}) for step in range(1, 31)])
    _write(tmp_path / "test", [
        (10, {"correct_prediction": 9925, "wrong_prediction": 75}),
        (20, {"correct_prediction": 9950, "wrong_prediction": 50}),
        (30, {"correct_prediction": 9940, "wrong_prediction": 60}),
    ])
    result = _run(tmp_path, "--thresholds=99.3,99.5,99.9", "--step_secs=1.5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    reached = [line for line in lines if line.startswith(("99.30%", "99.50%"))]
    assert [line.split(" (")[0] for line in reached] == ["99.30%: step 20", "99.50%: step 20"]
    # 20 steps at 1.5 s: 0.5 minutes.
    assert all("(0.5 at --step_secs)" in line for line in reached), result.stdout
    assert "99.90%: not reached by step 30" in lines, result.stdout
    assert [line.split()[0] for line in lines[1:4]] == ["10", "20", "30"]


def test_script_without_test_summaries_says_what_to_run(tmp_path):
    _write(tmp_path / "train", [(1, {"loss": 1.0})])
    result = _run(tmp_path)
    assert result.returncode != 0
    assert "no test summaries" in result.stderr and "test the checkpoints first" in result.stderr
