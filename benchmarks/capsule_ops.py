"""The MNIST CapsNet's two costliest operations, each against its plain TensorFlow form.

  python benchmarks/capsule_ops.py                  # about 1 minute on an idle 2-core CPU
  python benchmarks/capsule_ops.py --batch_sizes=128 --repeats=3
  python benchmarks/capsule_ops.py --batch_sizes=128 --dtype=bfloat16

- The primary capsules' convolution (conv1's 20x20x256 output, 9x9 kernel, stride 2, 256
  channels out): `capsules.conv.patch_conv2d` against `tf.nn.conv2d`, forward only, forward
  and the kernel's gradient, forward and both gradients (what training runs).
- conv1 (the 28x28x1 image, 9x9 kernel, stride 1, 256 channels out), the same two forms,
  forward only and forward and the kernel's gradient (the image needs none).
  Both convolutions in --dtype: bfloat16 is what `experiment.py --mixed_bfloat16` runs them in.
- The class capsules' routing (1152 primary capsules of 8 atoms voting for 10 capsules of
  16, 3 iterations), votes included: the `Capsule` layer's routing (`capsules.ops`, a
  `tf.while_loop` with its gradient written out) against `plain_update_routing`, the same
  iterations unrolled and differentiated by autodiff.

Each is a tf.function, timed `--repeats` times after one untimed call; the best is kept.
The last columns give the plain form's time over the package's (above 1: the package is
faster) and the largest difference of the outputs and gradients relative to their scale.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from capsules import layers  # noqa: E402
from capsules.conv import patch_conv2d  # noqa: E402
from tests.reference_tf import plain_update_routing  # noqa: E402

FLAGS = flags.FLAGS


def _best_seconds(fn, repeats: int) -> float:
    tf.nest.map_structure(lambda t: t.numpy(), fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), fn())
        best = min(best, time.perf_counter() - start)
    return best


def _relative_difference(ours, plain) -> float:
    ours, plain = ([tf.cast(t, tf.float32) for t in ts] for ts in (ours, plain))
    return max(float(tf.reduce_max(tf.abs(a - b)) / (tf.reduce_max(tf.abs(b)) + 1e-30))
               for a, b in zip(ours, plain, strict=True))


def _timed(fn, sources, upstream):
    """tf.function returning fn()'s output and the gradients of <output, upstream> to `sources`."""
    def run():
        with tf.GradientTape() as tape:
            tape.watch(sources)
            output = fn()
            loss = tf.reduce_sum(output * upstream)
        return [output, *tape.gradient(loss, sources)] if sources else [output]
    return tf.function(run)


def convolution_cases(batch_size: int, rng: np.random.Generator):
    """(name, package fn, plain fn) of the primary capsules' convolution and conv1's."""
    dtype = tf.as_dtype(FLAGS.dtype)
    # (name, input [height, width, channels], kernel size, strides, output size, with the
    # input's gradient): the primary capsules' convolution, then conv1's.
    for conv_name, input_shape, kernel_size, strides, out_size, input_grad in (
            ("primary", (20, 20, 256), 9, 2, 6, True), ("conv1", (28, 28, 1), 9, 1, 20, False)):
        channels_in, channels_out = input_shape[-1], 256
        inputs = tf.constant(rng.random((batch_size, *input_shape)), dtype)
        kernel = tf.constant(
            rng.normal(0, 0.01, (kernel_size, kernel_size, channels_in, channels_out)), dtype)
        upstream = tf.constant(rng.normal(size=(batch_size, out_size, out_size, channels_out)),
                               dtype)
        cases = [("forward", []), ("+ kernel grad", [kernel])]
        if input_grad:
            cases.append(("+ both grads", [kernel, inputs]))
        for name, sources in cases:
            yield f"{conv_name} {name}", *(
                _timed(lambda conv=conv, i=inputs, k=kernel, s=strides: conv(i, k, s, "VALID"),
                       sources, upstream)
                for conv in (patch_conv2d, tf.nn.conv2d)
            )


def routing_cases(batch_size: int, rng: np.random.Generator):
    """(name, package fn, plain fn) of the class capsules: votes, then 3 routing iterations."""
    inputs = tf.constant(rng.normal(0, 0.3, (batch_size, 1152, 8)).astype(np.float32))
    capsule = layers.Capsule(10, 16, num_routing=3)
    capsule.build(inputs.shape)
    upstream = tf.constant(rng.normal(size=(batch_size, 10, 16)).astype(np.float32))
    package = lambda: capsule(inputs)  # noqa: E731 - votes, then routing
    plain = lambda: plain_update_routing(capsule._votes(inputs), capsule.bias, 3)  # noqa: E731
    for name, sources in (("routing forward", []),
                          ("routing + grads", [inputs, capsule.kernel.value, capsule.bias.value])):
        yield name, _timed(package, sources, upstream), _timed(plain, sources, upstream)


def main(argv: list[str]) -> None:
    del argv
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.2f}; convolutions in {FLAGS.dtype}, routing in float32")
    header = (f"{'operation':<22}{'batch':>6}{'package_ms':>12}{'plain_ms':>10}"
              f"{'plain/package':>15}{'max_rel_diff':>14}")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for batch_size in (int(b) for b in FLAGS.batch_sizes):
        for cases in (convolution_cases, routing_cases):
            for name, package, plain in cases(batch_size, rng):
                difference = _relative_difference(package(), plain())
                package_s = _best_seconds(package, FLAGS.repeats)
                plain_s = _best_seconds(plain, FLAGS.repeats)
                print(f"{name:<22}{batch_size:>6}{package_s * 1e3:>12.1f}{plain_s * 1e3:>10.1f}"
                      f"{plain_s / package_s:>15.2f}{difference:>14.1e}", flush=True)


if __name__ == "__main__":
    flags.DEFINE_list("batch_sizes", ["128", "32"], "Batch sizes.")
    flags.DEFINE_integer("repeats", 5, "Timed calls of each function (best kept).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                      "dtype of the convolutions' inputs and kernels (the routing stays float32, "
                      "as under keras' mixed_bfloat16 policy).")
    app.run(main)
