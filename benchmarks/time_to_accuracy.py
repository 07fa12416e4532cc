"""Training minutes from scratch to given test accuracies, read from a run's summaries.

  # Test every checkpoint of the run (writes RUN/test, as continuous evaluation does):
  for c in RUN/train/model.ckpt-*.index; do
    python experiment.py --train=false --data_dir=DIR --summary_dir=RUN --checkpoint=${c%.index}
  done
  python benchmarks/time_to_accuracy.py --summary_dir=RUN --thresholds=99.3,99.5

Training time: the intervals between consecutive training-step summaries of RUN/train
(every step writes `loss`), in the order they were written, summed up to the step; steps
trained again after a resume count again. An interval longer than --max_gap_secs (the run
stopped, or was paused) counts as the run's median interval instead. Test accuracy: the
counts RUN/test holds for each checkpoint step (the last written, where a step was tested
twice). For each threshold: the first tested step at or above it and the training minutes to
it. Say with the figures which machine ran the run, and whether anything shared it; where
something did, --step_secs (a step's seconds measured alone, e.g. by benchmarks/throughput.py
at the run's batch size) adds the minutes at that pace, steps x step_secs.
"""

from __future__ import annotations

import glob
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("summary_dir", None, "The run's --summary_dir (train/ and test/ inside).")
flags.DEFINE_list("thresholds", ["99.3", "99.5"], "Test accuracies in percent.")
flags.DEFINE_float("max_gap_secs", 60.0, "Longer intervals between training steps count as "
                   "the median interval (stops, pauses).")
flags.DEFINE_float("step_secs", None, "Also give the minutes at this many seconds per step.")


def read_scalars(directory: str, *tags: str) -> dict[str, list[tuple[float, int, float]]]:
    """(wall_time, step, value) of every summary of each of `tags` in the event files of
    `directory`, in the order they were written (one pass over the files)."""
    import tensorflow as tf

    found = {tag: [] for tag in tags}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag in found:
                    found[value.tag].append((event.wall_time, event.step,
                                             float(tf.make_ndarray(value.tensor))))
    return {tag: sorted(values) for tag, values in found.items()}


def training_seconds(step_times: list[tuple[float, int]], max_gap: float) -> dict[int, float]:
    """Seconds of training up to each step (its last time), from (wall_time, step) of every
    training step in written order; intervals over `max_gap` count as the median one."""
    walls = [wall_time for wall_time, _ in step_times]
    intervals = [later - earlier for earlier, later in zip(walls[:-1], walls[1:], strict=True)]
    typical = statistics.median(intervals) if intervals else 0.0
    seconds, total = {}, 0.0
    for index, (_, step) in enumerate(step_times):
        if index:
            total += intervals[index - 1] if intervals[index - 1] <= max_gap else typical
        seconds[step] = total
    return seconds


def first_reaching(accuracy_by_step: dict[int, float], threshold: float) -> int | None:
    """The first step whose accuracy is at least `threshold` (None if none is)."""
    return next((step for step in sorted(accuracy_by_step)
                 if accuracy_by_step[step] >= threshold), None)


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    train_dir, test_dir = (os.path.join(f.summary_dir, name) for name in ("train", "test"))
    losses = read_scalars(train_dir, "loss")["loss"]
    if not losses:
        raise SystemExit(f"--summary_dir: no training-step summaries ('loss') in {train_dir}")
    test = read_scalars(test_dir, "correct_prediction", "wrong_prediction")
    correct, wrong = ({step: value for _, step, value in test[tag]}
                      for tag in ("correct_prediction", "wrong_prediction"))
    if not correct:
        raise SystemExit(f"--summary_dir: no test summaries in {test_dir}: test the "
                         "checkpoints first (see this script's docstring)")
    accuracy = {step: 100.0 * correct[step] / (correct[step] + wrong[step]) for step in correct}
    seconds = training_seconds([(wall_time, step) for wall_time, step, _ in losses],
                               f.max_gap_secs)
    def minutes(step: int) -> str:
        run = f"{seconds[step] / 60:.1f}" if step in seconds else "?"
        if f.step_secs is None:
            return run
        return f"{run} ({step * f.step_secs / 60:.1f} at --step_secs)"

    print(f"{'step':>7} {'test accuracy':>14}  training minutes")
    for step in sorted(accuracy):
        print(f"{step:>7} {accuracy[step]:>13.2f}%  {minutes(step)}")
    for threshold in map(float, f.thresholds):
        step = first_reaching(accuracy, threshold)
        if step is None:
            print(f"{threshold:.2f}%: not reached by step {max(accuracy)}")
        else:
            print(f"{threshold:.2f}%: step {step} ({accuracy[step]:.2f}%), "
                  f"{minutes(step)} training minutes")


if __name__ == "__main__":
    flags.mark_flag_as_required("summary_dir")
    app.run(main)
