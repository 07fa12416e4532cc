"""An EMCapsNet training step: the package's against a straightforward formulation.

  python benchmarks/em_capsnet.py                               # smallNORB, batch 16
  python benchmarks/em_capsnet.py --dataset=mnist --batch_size=64 --repeats=3

Both compute the same equations with the same weights on the same batch (the
spread loss and weight decay, their gradient, one Adam step):
- package: `capsules.models.EMCapsNet.optimize_step` (votes as batched matrix
  products laid out for the routing, the routed sums as matrix products, the
  gradient of the routing written out, see capsules/em_routing.py);
- plain: the walkthrough's formulation: k x k patches of poses stacked explicitly
  (strided slices), votes by broadcast matmul `[..., children, 1, 4, 4] x
  [children, types, 4, 4]`, the EM sums as elementwise products reduced over the
  children, and autodiff through the iterations. The per-child normalisation over
  all parents uses the same segment sums as the package (capsules.em_routing.ChildGrid).

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

from capsules import em_routing, losses  # noqa: E402
from capsules.em_routing import ChildGrid  # noqa: E402

FLAGS = flags.FLAGS
_SHAPES = {"norb": ((32, 32, 2), 5), "mnist": ((28, 28, 1), 10)}


def _plain_route(votes, child_activations, beta_v, beta_a, num_routing, final_lambda,
                 normalise):
    """EM iterations on votes `[*groups, children, parents, 16]`, a `[*groups, children, 1]`.

    normalise: logits `[*groups, children, parents]` -> assignment probabilities.
    """
    routes = normalise(tf.zeros_like(votes[..., 0]))
    for t, inverse_temperature in enumerate(
        em_routing.inverse_temperatures(num_routing, final_lambda)
    ):
        weights = (routes * child_activations)[..., None]
        mass = tf.reduce_sum(weights, axis=-3) + 1e-7
        mean = tf.reduce_sum(weights * votes, axis=-3) / mass
        deviation = votes - mean[..., None, :, :]
        variance = (
            tf.reduce_sum(weights * tf.square(deviation), axis=-3) / mass
            + em_routing.VARIANCE_FLOOR
        )
        cost = mass[..., 0] * tf.reduce_sum(
            em_routing.BETA_V_SCALE * beta_v[:, None] + 0.5 * tf.math.log(variance), axis=-1
        )
        logit = inverse_temperature * (em_routing.BETA_A_SCALE * beta_a - cost)
        if t == num_routing - 1:
            return mean, tf.sigmoid(logit)
        log_density = -0.5 * tf.reduce_sum(
            tf.math.log(2.0 * np.pi * variance[..., None, :, :])
            + tf.square(deviation) / variance[..., None, :, :],
            axis=-1,
        )
        routes = normalise(tf.math.log_sigmoid(logit)[..., None, :] + log_density)
    raise ValueError("num_routing must be >= 1")


def plain_em_routing(votes, activations, beta_v, beta_a, num_routing=3, final_lambda=0.01):
    """`capsules.ops.em_routing` written straightforwardly.

    votes `[batch, input_dim, output_dim, 16]`, activations `[batch, input_dim]`.
    """
    return _plain_route(
        votes, activations[:, :, None], beta_v, beta_a, num_routing, final_lambda,
        lambda logits: tf.nn.softmax(logits, axis=-1),
    )


def plain_conv_em_routing(votes, activations, beta_v, beta_a, kernel_size, strides,
                          num_routing=3, final_lambda=0.01):
    """`capsules.ops.conv_em_routing` written straightforwardly.

    votes `[batch, out_height, out_width, k^2 * input_dim, output_dim, 16]` (children
    before parents, as the walkthrough); returns `[batch, out_height, out_width, output_dim,
    16]` and `[batch, out_height, out_width, output_dim]`.
    """
    batch = tf.shape(votes)[0]
    _, out_height, out_width, children, output_dim, _ = votes.shape
    _, height, width, input_dim = activations.shape
    grid = ChildGrid(height, width, input_dim, kernel_size, strides)
    flat = tf.reshape(votes, [batch, out_height * out_width, children, output_dim, 16])

    def normalise(logits):  # [batch, positions, children, parents]
        return tf.transpose(grid.normalise(tf.transpose(logits, [0, 1, 3, 2])), [0, 1, 3, 2])

    child_activations = tf.transpose(grid.child_activations(activations), [0, 1, 3, 2])
    poses, parent_activations = _plain_route(
        flat, child_activations, beta_v, beta_a, num_routing, final_lambda, normalise
    )
    return (tf.reshape(poses, [batch, out_height, out_width, output_dim, 16]),
            tf.reshape(parent_activations, [batch, out_height, out_width, output_dim]))


def plain_conv_votes(poses, kernel, kernel_size, strides):
    """Votes `[b, oh, ow, k^2 * T, C, 16]`: patches stacked from strided slices, then matmul."""
    _, height, width, input_dim, _, _ = poses.shape
    out_height = (height - kernel_size) // strides + 1
    out_width = (width - kernel_size) // strides + 1
    patches = tf.stack([
        poses[:, ky:ky + strides * (out_height - 1) + 1:strides,
              kx:kx + strides * (out_width - 1) + 1:strides]
        for ky in range(kernel_size) for kx in range(kernel_size)
    ], axis=3)  # [b, oh, ow, k^2, T, 4, 4]
    children = kernel_size * kernel_size * input_dim
    patches = tf.reshape(patches, [-1, out_height, out_width, children, 1, 4, 4])
    weights = tf.reshape(kernel, [children, kernel.shape[3], 4, 4])
    votes = tf.matmul(patches, weights)
    return tf.reshape(votes, [-1, out_height, out_width, children, kernel.shape[3], 16])


def plain_class_votes(poses, kernel, coordinate_addition):
    """Class votes `[b, h * w * T, classes, 16]`, coordinates added as the package's layer."""
    from capsules.em_layers import _coordinate_offsets

    _, height, width, input_dim, _, _ = poses.shape
    votes = tf.matmul(poses[:, :, :, :, None], kernel)  # [b, h, w, T, classes, 4, 4]
    if coordinate_addition:
        offsets = _coordinate_offsets(height, width).reshape(height, width, 1, 1, 4, 4)
        votes += offsets
    return tf.reshape(votes, [-1, height * width * input_dim, kernel.shape[1], 16])


def plain_logits(model, images):
    """EMCapsNet's class activations computed by the plain formulation, the model's weights."""
    hp = model.hparams
    poses, activations = model.primary_capsules(model.conv1(images))
    for layer in (model.conv_capsules1, model.conv_capsules2):
        votes = plain_conv_votes(poses, layer.kernel, layer.kernel_size, layer.strides)
        poses, activations = plain_conv_em_routing(
            votes, activations, layer.beta_v, layer.beta_a, layer.kernel_size, layer.strides,
            hp.routing, hp.final_lambda,
        )
        poses = tf.reshape(poses, [-1, *poses.shape[1:-1], 4, 4])
    layer = model.class_capsules
    votes = plain_class_votes(poses, layer.kernel, layer.coordinate_addition)
    _, class_activations = plain_em_routing(
        votes, tf.reshape(activations, [-1, votes.shape[1]]), layer.beta_v, layer.beta_a,
        hp.routing, hp.class_final_lambda,
    )
    return class_activations


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
