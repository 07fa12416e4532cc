"""An EMCapsNet training step: the package's, the package's at another git revision, and a
straightforward formulation, side by side.

  python benchmarks/em_capsnet.py                               # smallNORB, batch 16
  python benchmarks/em_capsnet.py --dataset=mnist --batch_size=64 --repeats=3 \\
      --hparams_override=preset=mnist_small --formulations=package --baseline=4d7bb0b

All compute the same equations with the same weights on the same batch (the spread loss
and weight decay, their gradient, one Adam step):
- package: `capsules.models.EMCapsNet.optimize_step`: on a CPU, the convolutional
  capsule layers' votes computed where the routing uses them (capsules/em_kernels.py;
  CAPSULES_EM_KERNELS=0 turns that off), the class layer's votes as batched matrix
  products and its EM iterations XLA-compiled (capsules/em_routing.py);
- package@REV (--baseline=REV): the same step with the package as it was at git revision
  REV (`git archive`), e.g. the commit before a change, to measure the change;
- plain: the walkthrough's formulation (`tests/em_reference_tf.py`, also the tests'
  oracle): k x k patches of poses stacked explicitly (strided slices), votes by
  broadcast matmul `[..., children, 1, 4, 4] x [children, types, 4, 4]`, the EM sums as
  elementwise products reduced over the children, and autodiff through the iterations.
  The per-child normalisation over all parents uses the same segment sums as the
  package (capsules.em_routing.ChildGrid).

Each formulation runs in a process of its own (a worker) that builds the model, then
traces (and compiles) its step, a tf.function, with one untimed call. The workers then
take one timed step each in turn, --repeats rounds, so that a change in the machine's
load slows all alike; the best round of each is kept. Memory, from the worker's resident
set: the peak during its first step (tracing and compiling included), and the peak during
its last timed step (`/proc/self/clear_refs` resets the peak), each less the resident set
before the first step (model, optimizer and batch built).

--breakdown also times, per routed layer of the package formulations, its votes (the
patches of poses where the kernels compute the votes) and the whole layer, forward and
forward plus backward (the layer's gradient with respect to its inputs and weights), each a
tf.function on the inputs a forward pass gives the layer; routing = layer - votes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
_SHAPES = {"norb": ((32, 32, 2), 5), "mnist": ((28, 28, 1), 10)}
# What a baseline worker needs of the package at the baseline revision.
_BASELINE_PATHS = ["capsules", "tests/__init__.py", "tests/em_reference_tf.py"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_memory() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _step_function(kind: str, dataset: str, batch_size: int, hparams_override: str | None):
    """(a tf.function taking no arguments: one optimizer step, returning the loss; the model;
    the images)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from capsules import losses
    from capsules.em_hparams import EMHParams
    from capsules.hparams import parse_overrides
    from capsules.models import EMCapsNet

    shape, num_classes = _SHAPES[dataset]
    keras.utils.set_random_seed(0)
    model = EMCapsNet(parse_overrides(EMHParams(), hparams_override), input_shape=shape,
                      num_classes=num_classes)
    model.compile()
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch_size, *shape)).astype(np.float32))
    labels = tf.one_hot(rng.integers(0, num_classes, batch_size), num_classes)

    if kind == "plain":
        from tests.em_reference_tf import plain_logits

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                activations = plain_logits(model, images)
                loss = losses.spread_loss(labels, activations, model.margin()) + (
                    model.hparams.weight_decay
                    * tf.add_n([tf.nn.l2_loss(w) for w in model.kernels])
                )
            gradients = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply(gradients, model.trainable_variables)
            return loss
    else:
        @tf.function
        def step():
            return model.optimize_step((images, labels))["loss"]

    return step, model, images


def _layer_pieces(model, images) -> dict:
    """{(layer name, piece): a tf.function of no arguments} for the routed layers' votes and
    whole layers, forward and forward plus backward (see the module docstring)."""
    import tensorflow as tf

    capsules = model.conv1(images, training=True)
    if model.conv1_norm is not None:
        capsules = tf.nn.relu(model.conv1_norm(capsules, training=True))
    pieces = {}
    for layer in model.capsule_layers:
        if hasattr(layer, "votes"):
            poses, activations = (tf.identity(x) for x in capsules)
            pieces.update(_pieces_of(layer, poses, activations))
        capsules = layer(capsules, training=True)
    return pieces


def _pieces_of(layer, poses, activations) -> dict:
    import tensorflow as tf

    def backward(forward, inputs):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = tf.add_n([tf.reduce_sum(x) for x in tf.nest.flatten(forward())])
            return tape.gradient(loss, [*inputs, *layer.trainable_variables])
        return run

    try:
        from capsules import em_kernels
    except ImportError:  # a --baseline revision from before the kernels
        computed = False
    else:
        computed = hasattr(layer, "patches") and em_kernels.available()

    def votes():
        return layer.patches(poses) if computed else layer.votes(poses)

    def whole():
        return layer([poses, activations], training=True)

    return {(layer.name, "votes"): tf.function(votes),
            (layer.name, "votes+grad"): backward(votes, [poses]),
            (layer.name, "layer"): tf.function(whole),
            (layer.name, "layer+grad"): backward(whole, [poses, activations])}


def run_worker() -> None:
    """Builds one formulation's step, then takes a timed step per 'step' line on stdin,
    answering each with a JSON line."""
    import tensorflow as tf

    # Not the warnings that the breakdown's many tf.functions, each traced once, retrace.
    tf.get_logger().setLevel("ERROR")
    sys.path.insert(0, FLAGS.package_root or ROOT)
    step, model, images = _step_function(FLAGS.worker, FLAGS.dataset, FLAGS.batch_size,
                                         FLAGS.hparams_override)
    pieces = None
    before_kb = _status_kb("VmRSS")
    _reset_peak_memory()
    start = time.perf_counter()
    loss = float(step())
    print(json.dumps({"first_step_s": time.perf_counter() - start, "loss": loss,
                      "first_step_mb": (_status_kb("VmHWM") - before_kb) / 1024}), flush=True)
    for line in sys.stdin:
        if line.strip() == "breakdown":
            if pieces is None:
                pieces = _layer_pieces(model, images)
                for piece in pieces.values():  # traced and compiled, untimed
                    piece()
            print(json.dumps({" ".join(key): _seconds(piece) for key, piece in pieces.items()}),
                  flush=True)
            continue
        if line.strip() != "step":
            break
        _reset_peak_memory()
        start, start_cpu = time.perf_counter(), time.process_time()
        float(step())
        print(json.dumps({"seconds": time.perf_counter() - start,
                          "cpu_seconds": time.process_time() - start_cpu,
                          "step_mb": (_status_kb("VmHWM") - before_kb) / 1024}), flush=True)


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


class _Worker:
    """A worker process of one formulation, started and warmed up."""

    def __init__(self, name: str, kind: str, package_root: str):
        self.name, self.kind = name, kind
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={kind}",
             f"--package_root={package_root}", f"--dataset={FLAGS.dataset}",
             f"--batch_size={FLAGS.batch_size}",
             f"--hparams_override={FLAGS.hparams_override or ''}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.first = self._answer()
        self.steps: list[dict] = []
        self.breakdowns: list[dict] = []

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker stopped (exit status "
                               f"{self.process.wait()}); its error is above")
        return json.loads(line)

    def step(self) -> None:
        self.steps.append(self._ask("step"))

    def breakdown(self) -> None:
        self.breakdowns.append(self._ask("breakdown"))

    def _ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _export(revision: str, directory: str) -> None:
    """The package's files at git `revision` into `directory`."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, *_BASELINE_PATHS],
                             capture_output=True)
    if archive.returncode:
        raise app.UsageError(f"--baseline={revision}: git archive of {ROOT} failed: "
                             f"{archive.stderr.decode().strip().splitlines()[-1]}")
    subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)


def main(argv):
    del argv
    if FLAGS.worker:
        run_worker()
        return
    from capsules.em_hparams import EMHParams
    from capsules.hparams import parse_overrides

    try:
        parse_overrides(EMHParams(), FLAGS.hparams_override)
    except ValueError as error:
        raise app.UsageError(f"--hparams_override: {error}") from None
    print(f"EMCapsNet training step, {FLAGS.dataset}, batch {FLAGS.batch_size}, hparams "
          f"{FLAGS.hparams_override or 'default'}, best of {FLAGS.repeats} alternating rounds; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as baseline_root:
        specs = []
        if FLAGS.baseline:
            _export(FLAGS.baseline, baseline_root)
            specs.append((f"package@{FLAGS.baseline}", "package", baseline_root))
        specs += [(kind, kind, ROOT) for kind in FLAGS.formulations]
        workers = []
        try:
            for spec in specs:
                workers.append(_Worker(*spec))
            for _ in range(FLAGS.repeats):
                for worker in workers:
                    worker.step()
            for _ in range(FLAGS.repeats if FLAGS.breakdown else 0):
                for worker in workers:
                    if worker.kind == "package":
                        worker.breakdown()
        finally:
            for worker in workers:
                worker.close()
    print(f"{'formulation':24s} {'ms/step':>8s} {'(CPU ms)':>9s} {'images/s':>9s} "
          f"{'first loss':>11s} {'step MB':>8s} {'first step MB (s)':>18s}")
    best = {}
    for worker in workers:
        fastest = min(worker.steps, key=lambda step: step["seconds"])
        best[worker.name] = fastest["seconds"]
        first = worker.first
        cpu = f"({fastest['cpu_seconds'] * 1000:.0f})"
        first_step = f"{first['first_step_mb']:.0f} ({first['first_step_s']:.1f})"
        print(f"{worker.name:24s} {fastest['seconds'] * 1000:8.0f} {cpu:>9s} "
              f"{FLAGS.batch_size / fastest['seconds']:9.1f} {first['loss']:11.6f} "
              f"{worker.steps[-1]['step_mb']:8.0f} {first_step:>18s}")
    for name in best:
        if name != "package" and "package" in best:
            print(f"{name} / package: {best[name] / best['package']:.2f}x")
    for worker in workers:
        if worker.breakdowns:
            _print_breakdown(worker)


def _print_breakdown(worker: _Worker) -> None:
    """Per routed layer: votes, routing (layer - votes) and layer, forward and forward plus
    backward, ms (best of the rounds)."""
    best = {key: min(round_[key] for round_ in worker.breakdowns)
            for key in worker.breakdowns[0]}
    print(f"{worker.name}, ms (forward / forward+backward): "
          f"{'votes':>15s} {'routing':>15s} {'layer':>15s}")
    for name in dict.fromkeys(key.split()[0] for key in best):
        votes = best[f"{name} votes"], best[f"{name} votes+grad"]
        layer = best[f"{name} layer"], best[f"{name} layer+grad"]
        routing = layer[0] - votes[0], layer[1] - votes[1]
        cells = [f"{a * 1000:.0f} / {b * 1000:.0f}" for a, b in (votes, routing, layer)]
        print(f"  {name:38s} {cells[0]:>15s} {cells[1]:>15s} {cells[2]:>15s}")


if __name__ == "__main__":
    flags.DEFINE_enum("dataset", "norb", list(_SHAPES), "Input shape and classes.")
    flags.DEFINE_integer("batch_size", 16, "Images per step.", lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Timed rounds (the best step of each formulation is "
                         "kept).", lower_bound=1)
    flags.DEFINE_string("hparams_override", None,
                        "EMHParams overrides, key=value,... (preset=mnist_small: the paper's "
                        "small model).")
    flags.DEFINE_multi_enum("formulations", ["package", "plain"], ["package", "plain"],
                            "The working tree's steps to time.")
    flags.DEFINE_string("baseline", None,
                        "A git revision whose package's step is timed too (package@REV).")
    flags.DEFINE_bool("breakdown", False, "Also time each routed layer's votes and routing, "
                      "forward and backward (package formulations).")
    flags.DEFINE_enum("worker", None, ["package", "plain"],
                      "Internal: run as the worker of one formulation.")
    flags.DEFINE_string("package_root", None, "Internal: the worker's package directory.")
    app.run(main)
