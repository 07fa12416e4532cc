"""An EMCapsNet training step: the package's against a straightforward formulation.

  python benchmarks/em_capsnet.py                               # smallNORB, batch 16
  python benchmarks/em_capsnet.py --dataset=mnist --batch_size=64 --repeats=3

Both compute the same equations with the same weights on the same batch (the
spread loss and weight decay, their gradient, one Adam step):
- package: `capsules.models.EMCapsNet.optimize_step` (votes as batched matrix
  products laid out for the routing, the routed sums as matrix products, the
  gradient of the routing written out, see capsules/em_routing.py);
- plain: the walkthrough's formulation (`tests/em_reference_tf.py`, also the tests'
  oracle): k x k patches of poses stacked explicitly (strided slices), votes by
  broadcast matmul `[..., children, 1, 4, 4] x [children, types, 4, 4]`, the EM sums as
  elementwise products reduced over the children, and autodiff through the iterations.
  The per-child normalisation over all parents uses the same segment sums as the
  package (capsules.em_routing.ChildGrid).

Each step is a tf.function, timed --repeats times after one untimed call (the best
is kept). Memory: the peak resident set size of a child process that runs only that
step (`ru_maxrss`), minus that of the same process after building the model, so
the figure is the step's own working memory.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from capsules import losses  # noqa: E402
from tests.em_reference_tf import plain_logits  # noqa: E402

FLAGS = flags.FLAGS
_SHAPES = {"norb": ((32, 32, 2), 5), "mnist": ((28, 28, 1), 10)}


def plain_step_fn(model):
    """A tf.function: one optimizer step of `model` (compiled) through `plain_logits`."""
    optimizer = model.optimizer

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            activations = plain_logits(model, images)
            loss = losses.spread_loss(labels, activations, model.margin()) + (
                model.hparams.weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in model.kernels])
            )
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    return step


def package_step_fn(model):
    @tf.function
    def step(images, labels):
        return model.optimize_step((images, labels))["loss"]

    return step


def _setup(dataset, batch_size, seed=0):
    from capsules.models import EMCapsNet

    shape, num_classes = _SHAPES[dataset]
    keras.utils.set_random_seed(seed)
    model = EMCapsNet(input_shape=shape, num_classes=num_classes)
    model.compile()
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.normal(size=(batch_size, *shape)).astype(np.float32))
    labels = tf.one_hot(rng.integers(0, num_classes, batch_size), num_classes)
    return model, images, labels


def _time_steps(step, images, labels, repeats):
    """(best wall seconds, CPU seconds of that step, first loss)."""
    loss = float(step(images, labels))  # trace and warm up
    times = []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        float(step(images, labels))
        times.append((time.perf_counter() - start, time.process_time() - start_cpu))
    return (*min(times), loss)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(kind: str, dataset: str, batch_size: int) -> float:
    """Peak resident memory (MB) of a fresh process during one `kind` step, less its
    resident memory before the step (model, optimizer and batch built)."""
    model, images, labels = _setup(dataset, batch_size)
    step = (package_step_fn if kind == "package" else plain_step_fn)(model)
    model.optimizer.build(model.trainable_variables)
    before = _rss_mb()
    float(step(images, labels))
    return _peak_rss_mb() - before


def main(argv):
    del argv
    if FLAGS.memory_of:
        print(f"{measure_memory(FLAGS.memory_of, FLAGS.dataset, FLAGS.batch_size):.0f}")
        return
    print(f"EMCapsNet training step, {FLAGS.dataset}, batch {FLAGS.batch_size}, "
          f"best of {FLAGS.repeats}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    results = {}
    steps = {"package": package_step_fn, "plain": plain_step_fn}
    for kind in FLAGS.formulations:
        make_step = steps[kind]
        model, images, labels = _setup(FLAGS.dataset, FLAGS.batch_size)
        seconds, cpu_seconds, loss = _time_steps(make_step(model), images, labels,
                                                 FLAGS.repeats)
        results[kind] = seconds
        memory = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--memory_of={kind}",
             f"--dataset={FLAGS.dataset}", f"--batch_size={FLAGS.batch_size}"],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        print(f"{kind:8s} {seconds * 1000:8.0f} ms/step (CPU {cpu_seconds * 1000:.0f} ms)  "
              f"{FLAGS.batch_size / seconds:7.1f} images/s  first loss {loss:.6f}  "
              f"step memory {memory} MB")
    if len(results) == 2:
        print(f"plain / package: {results['plain'] / results['package']:.2f}x")


if __name__ == "__main__":
    flags.DEFINE_enum("dataset", "norb", list(_SHAPES), "Input shape and classes.")
    flags.DEFINE_integer("batch_size", 16, "Images per step.", lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Timed steps (the best is kept).", lower_bound=1)
    flags.DEFINE_multi_enum("formulations", ["package", "plain"], ["package", "plain"],
                            "Which steps to time.")
    flags.DEFINE_enum("memory_of", None, ["package", "plain"],
                      "Internal: print the step memory of one formulation and exit.")
    app.run(main)
