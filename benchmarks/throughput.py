"""Training and evaluation throughput of CapsNet against the reference's formulation.

In one process, side by side, for this package's CapsNet (MNIST, with decoder,
default hparams) and for the same network written in the reference's
formulation (`ReferenceCapsNet` below):
  - training images/s through `model.fit` (Adam of `compile()`, a repeated
    in-memory tf.data dataset of random 28x28x1 images and int labels),
  - evaluation images/s through `model.predict`,
  - the fit row: whole calls of `model.fit` of --fit_steps steps (the iterator's end
    included, where tf.data's autotune stall would show) against the same steps in the
    package's own loop and in `keras.Model.fit` without the package's adapter,
at each batch size of --batch_sizes; the float32 matmul GFLOP/s of the same
TensorFlow (2048x2048, tf.function); the FLOPs per image counted from the
layer shapes; and the peak memory of a step. Every measurement is repeated
--rounds times, the models alternating, and the best images/s kept (the
machine may be shared).

  python benchmarks/throughput.py            # about 2.5 minutes on an idle 2-core CPU
  python benchmarks/throughput.py --rounds=1 --train_steps=2 --eval_steps=2 --warmup=1  # smoke
  python benchmarks/throughput.py --jit_compile --nomixed_bfloat16 --batch_sizes=128 --rounds=1

--mixed_bfloat16 (default) adds 'package+bf16' (`experiment.py --mixed_bfloat16`, see
`mixed_bfloat16_capsnet`); --jit_compile adds 'package+xla' (model.compile(jit_compile=True)).
A variant that fails prints its error in the table.

The last line is
  train_ratio_vs_reference=X fraction_of_ceiling=Y eval_ratio_vs_reference=Z
with X (Z) = package / reference training (evaluation) images/s at the first
batch size, Y = package training images/s / (matmul float32 FLOP/s / training
FLOPs per image); the lines before it give the same for each variant
('package+bf16: ...'). Training FLOPs are 3x the forward FLOPs (forward, gradient of the
inputs, gradient of the weights); evaluation FLOPs are the forward FLOPs of the
logits only (predict does not run the decoder).

Memory, of one more steady-state step after the timed ones (predict: of one batch):
`step_MiB` is the peak bytes TensorFlow's CPU allocator handed out during the step
beyond those live before it (activations, gradients, temporaries); `tf_peak_MiB`
the peak of all its live bytes (weights and optimizer slots included); `rss_MiB`
the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs
before the step), which includes the allocator's pool, sized by the largest step
any model of this process ran before.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from capsules import CapsNet, default_hparams  # noqa: E402
from capsules.tf_data import without_autotune  # noqa: E402

FLAGS = flags.FLAGS


# -- The reference's formulation (Sarasra/models, research/capsules/models/layers/layers.py) --
# Written from the reference's `_squash`, `_leaky_routing`, `_update_routing`,
# `capsule` and `conv_slim_capsule`: votes of the fully connected layer by tiling
# the input and reduce_sum, routing in a while_loop of `num_routing` iterations
# with transposes, tiling and a TensorArray of activations. Capsule atoms are on
# axis 2 (the reference's NCHW layout, [batch, capsules, atoms, height, width]).


def reference_squash(x: tf.Tensor) -> tf.Tensor:
    """The reference's `_squash`: norm over axis 2 (atoms), plain division by the norm."""
    norm = tf.norm(x, axis=2, keepdims=True)
    norm_squared = norm * norm
    return (x / norm) * (norm_squared / (1 + norm_squared))


def reference_leaky_routing(logits: tf.Tensor, output_dim: int) -> tf.Tensor:
    """The reference's `_leaky_routing`: a zero logit in front of axis 2, softmax, dropped."""
    leak = tf.reduce_sum(tf.zeros_like(logits), axis=2, keepdims=True)
    leaky_logits = tf.concat([leak, logits], axis=2)
    leaky_routing = tf.nn.softmax(leaky_logits, axis=2)
    return tf.split(leaky_routing, [1, output_dim], 2)[1]


def reference_update_routing(votes, biases, logit_shape, num_dims, input_dim, output_dim,
                             num_routing, leaky):
    """The reference's `_update_routing`.

    votes `[batch, input_dim, output_dim, atoms, (height, width)]`, biases
    broadcastable to `[output_dim, atoms, (height, width)]`; returns
    `[batch, output_dim, atoms, (height, width)]`, the activation of the last of
    `num_routing` iterations (all of them update the logits, as the reference does).
    """
    spatial = list(range(4, num_dims))
    votes_trans = tf.transpose(votes, [3, 0, 1, 2] + spatial)
    route_trans_shape = [1, 2, 3, 0] + spatial

    def body(i, logits, activations):
        if leaky:
            route = reference_leaky_routing(logits, output_dim)
        else:
            route = tf.nn.softmax(logits, axis=2)
        preactivate_unrolled = route * votes_trans
        preact_trans = tf.transpose(preactivate_unrolled, route_trans_shape)
        preactivate = tf.reduce_sum(preact_trans, axis=1) + biases
        activation = reference_squash(preactivate)
        activations = activations.write(i, activation)
        tile_shape = [1] * num_dims
        tile_shape[1] = input_dim
        act_replicated = tf.tile(tf.expand_dims(activation, 1), tile_shape)
        distances = tf.reduce_sum(votes * act_replicated, axis=3)
        return i + 1, logits + distances, activations

    activations = tf.TensorArray(dtype=tf.float32, size=num_routing, clear_after_read=False)
    logits = tf.fill(logit_shape, 0.0)
    _, _, activations = tf.while_loop(
        lambda i, logits, activations: i < num_routing,
        body,
        loop_vars=[tf.constant(0), logits, activations],
        swap_memory=True,
    )
    return activations.read(num_routing - 1)


def reference_capsule(inputs, kernel, biases, output_dim, output_atoms, num_routing, leaky):
    """The reference's `capsule`: inputs `[batch, input_dim, input_atoms]` ->
    `[batch, output_dim, output_atoms]`, votes by tile + multiply + reduce_sum."""
    input_dim = inputs.shape[1]
    input_tiled = tf.tile(tf.expand_dims(inputs, -1), [1, 1, 1, output_dim * output_atoms])
    votes = tf.reduce_sum(input_tiled * kernel, axis=2)
    votes_reshaped = tf.reshape(votes, [-1, input_dim, output_dim, output_atoms])
    logit_shape = tf.stack([tf.shape(inputs)[0], input_dim, output_dim])
    return reference_update_routing(votes_reshaped, biases, logit_shape, 4, input_dim,
                                    output_dim, num_routing, leaky)


def reference_primary_capsules(hidden, kernel, biases, strides, padding, leaky):
    """The reference's `conv_slim_capsule` with input_dim=1, num_routing=1, followed by
    the reference model's flattening to `[batch, capsules * height * width, atoms]`.

    hidden: conv1's `[batch, height, width, channels]`. The convolution is NHWC
    (the reference's is NCHW; same values); its output is moved to the reference's
    layout `[batch, 1, output_dim, atoms, height, width]` before routing.
    """
    output_dim, atoms = biases.shape
    conv = tf.nn.conv2d(hidden, kernel, strides, padding)
    _, height, width, _ = conv.shape
    batch = tf.shape(hidden)[0]
    votes = tf.transpose(tf.reshape(conv, [-1, height, width, output_dim, atoms]),
                         [0, 3, 4, 1, 2])[:, None]
    biases_replicated = tf.tile(tf.reshape(biases, [output_dim, atoms, 1, 1]),
                                [1, 1, height, width])
    logit_shape = tf.stack([batch, 1, output_dim, height, width])
    capsule1 = reference_update_routing(votes, biases_replicated, logit_shape, 6, 1,
                                        output_dim, 1, leaky)
    capsule1_atom_last = tf.transpose(capsule1, [0, 1, 3, 4, 2])
    return tf.reshape(capsule1_atom_last, [batch, output_dim * height * width, atoms])


class ReferenceCapsNet(CapsNet):
    """CapsNet with the capsule layers' votes and routing in the reference's formulation.

    Same layers and variables as `CapsNet` (so `set_weights` of a CapsNet's
    weights works); conv1, the lengths, the decoder, the losses and training are
    CapsNet's. Only `class_capsule_outputs` is replaced.
    """

    def class_capsule_outputs(self, images, training=False):
        hidden = self.conv1(images, training=training)
        primary = self.primary_capsules
        primary_out = reference_primary_capsules(
            hidden, primary.kernel, primary.bias, primary.strides, primary.padding, primary.leaky
        )
        capsules = self.class_capsules
        return reference_capsule(
            primary_out, capsules.kernel, capsules.bias, capsules.num_capsules, capsules.atoms,
            capsules.num_routing, capsules.leaky,
        )


# -- FLOPs counted from the layer shapes -----------------------------------------------------


def forward_flops(model: CapsNet) -> dict[str, float]:
    """Forward FLOPs per image (multiply-add = 2 FLOPs) of the matmul-like work of each part.

    Routing counts the weighted sums (every iteration) and the agreements (every
    iteration but the last, which CapsNet skips); softmax and squash are
    elementwise and left out. 'decoder' runs in training only.
    """
    image = (1, *model.image_shape)
    conv1_shape = model.conv1.compute_output_shape(image)
    k1 = model.conv1.kernel.shape
    primary = model.primary_capsules
    grid = primary.compute_output_shape(conv1_shape)  # [1, input_dim, atoms]
    kp = primary.kernel.shape
    num_positions = grid[1] // primary.num_capsules
    capsules = model.class_capsules
    input_dim, input_atoms = grid[1], grid[2]
    outputs = capsules.num_capsules * capsules.atoms
    counts = {
        "conv1": 2 * conv1_shape[1] * conv1_shape[2] * k1[0] * k1[1] * k1[2] * k1[3],
        "primary": 2 * num_positions * kp[0] * kp[1] * kp[2] * kp[3],
        "votes": 2 * input_dim * input_atoms * outputs,
        "routing": 2 * input_dim * outputs * (2 * capsules.num_routing - 1),
    }
    if model.decoder is not None:
        sizes = [outputs, *(layer.units for layer in model.decoder.dense_layers)]
        counts["decoder"] = sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return {name: float(value) for name, value in counts.items()}


# -- Measurements -----------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> None:
    """Resets this process's VmHWM to its VmRSS (Linux >= 4.0)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _tf_cpu_memory() -> dict:
    try:
        return tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        return {"current": float("nan"), "peak": float("nan")}


def _memory_of_one_step(run_one_step) -> dict:
    """Peak memory of one more steady-state step, run after the timed ones.

    tf_peak_MiB: peak bytes of the tensors live in TensorFlow's CPU allocator
      during the step (weights and optimizer slots included);
    step_MiB: that peak minus the bytes live just before the step: what the step
      itself allocates at its peak (activations, gradients, temporaries);
    rss_MiB: the process's peak resident set (VmHWM, reset before the step).
      TensorFlow's allocator keeps freed memory in its pool, so this is the
      largest pool any earlier step of the process needed plus everything else.
    """
    with contextlib.suppress(ValueError, RuntimeError):
        tf.config.experimental.reset_memory_stats("CPU:0")
    before = _tf_cpu_memory()["current"]
    _reset_peak_rss()
    run_one_step()
    peak = _tf_cpu_memory()["peak"]
    return {"rss_MiB": _proc_status_kib("VmHWM") / 1024, "tf_peak_MiB": peak / 2**20,
            "step_MiB": (peak - before) / 2**20}


class _StepTimer(keras.callbacks.Callback):
    """Wall time from the start of batch `warmup` to the end of the last batch."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup = warmup
        self.start = None
        self.end = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.end = time.perf_counter()

    on_predict_batch_begin = on_train_batch_begin
    on_predict_batch_end = on_train_batch_end

    def images_per_s(self, batch_size: int, steps: int) -> float:
        return steps * batch_size / (self.end - self.start)


def random_dataset(batch_size: int, num_batches: int = 4, seed: int = 0) -> tf.data.Dataset:
    """A repeated in-memory dataset of random 28x28x1 images in [0, 1) and int labels."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size * num_batches, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, batch_size * num_batches).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size, drop_remainder=True)
    return ds.cache().repeat().prefetch(2)


def measure_train(model, batch_size: int, warmup: int, steps: int, memory: bool = True) -> dict:
    timer = _StepTimer(warmup)
    data = random_dataset(batch_size)
    model.fit(data, epochs=1, steps_per_epoch=warmup + steps, verbose=0, shuffle=False,
              callbacks=[timer])
    result = {"images_per_s": timer.images_per_s(batch_size, steps)}
    if memory:
        result.update(_memory_of_one_step(
            lambda: model.fit(data, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)))
    return result


def measure_eval(model, batch_size: int, warmup: int, steps: int, memory: bool = True) -> dict:
    timer = _StepTimer(warmup)
    images = random_dataset(batch_size).map(lambda x, y: x)
    model.predict(images, steps=warmup + steps, verbose=0, callbacks=[timer])
    result = {"images_per_s": timer.images_per_s(batch_size, steps)}
    if memory:
        result.update(_memory_of_one_step(lambda: model.predict(images, steps=1, verbose=0)))
    return result


def measure_fit_and_loop(model, batch_size: int, steps: int) -> dict:
    """Images/s over whole calls of `steps` training steps, the iterator's end included:
    'fit' (the package's model.fit, on an autotuned dataset as users write it), 'keras_fit'
    (keras.Model.fit on the same model and dataset, i.e. without the package's adapter)
    and 'loop' (the package's own loop, capsules/training.py: a tf.function of
    optimize_step over an iterator of a dataset without autotune, as input_data builds)."""
    data = random_dataset(batch_size)
    step = tf.function(model.optimize_step)

    def loop(count):
        batches = iter(without_autotune(data))
        for _ in range(count):
            float(step(next(batches))["loss"])

    calls = {"fit": lambda count: model.fit(data, steps_per_epoch=count, verbose=0),
             "keras_fit": lambda count: keras.Model.fit(model, data, steps_per_epoch=count,
                                                        verbose=0),
             "loop": loop}
    result = {}
    for name, call in calls.items():
        call(1)  # traces
        start = time.perf_counter()
        call(steps)
        result[name] = steps * batch_size / (time.perf_counter() - start)
    return result


def matmul_gflops(size: int, iterations: int, dtype=tf.float32) -> float:
    """Best GFLOP/s of a size x size matmul of `dtype` in a tf.function."""
    a = tf.cast(tf.random.normal([size, size], seed=1), dtype)
    b = tf.cast(tf.random.normal([size, size], seed=2), dtype)
    matmul = tf.function(tf.matmul)
    matmul(a, b).numpy()
    best = float("inf")
    for _ in range(iterations):
        start = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def make_model(cls, weights=None, jit_compile=False):
    model = cls(default_hparams())
    if weights is not None:
        model.set_weights(weights)
    model.compile(jit_compile=jit_compile)
    return model


def _error_summary(error: Exception) -> str:
    """The exception's type and its most telling line (TensorFlow's carry stack traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "XLA" in line or "dtype" in line or "tensor" in line]
    return f"{type(error).__name__}: {(telling or lines or [''])[0][:240]}"


def _define_flags():
    flags.DEFINE_list("batch_sizes", ["128", "32"], "Batch sizes; the ratios use the first.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps (tracing, first calls) before timing.")
    flags.DEFINE_integer("train_steps", 5, "Timed training steps per model and batch size.")
    flags.DEFINE_integer("eval_steps", 10, "Timed predict steps per model and batch size.")
    flags.DEFINE_integer("fit_steps", 5, "Training steps per call of the fit row (model.fit "
                         "against the package's own loop, whole calls).")
    flags.DEFINE_integer("rounds", 2, "Measure everything this many times, alternating the "
                         "models, and keep each one's best (for a noisy machine).")
    flags.DEFINE_integer("matmul_size", 2048, "Matrix size of the matmul ceiling.")
    flags.DEFINE_integer("matmul_iterations", 10, "Timed matmuls (best kept).")
    flags.DEFINE_boolean("mixed_bfloat16", True, "Also measure the package's CapsNet under "
                         "keras' 'mixed_bfloat16' policy, and compare its logits and loss.")
    flags.DEFINE_boolean("jit_compile", False, "Also measure the package's CapsNet compiled "
                         "with XLA (model.compile(jit_compile=True)).")


def _stage_dtypes(model, images) -> dict:
    hidden = model.conv1(images)
    primary = model.primary_capsules(hidden)
    capsules = model.class_capsules(primary)
    return {"conv1": hidden.dtype.name, "primary capsules (conv + squash)": primary.dtype.name,
            "class capsules (votes + routing)": capsules.dtype.name,
            "logits": model.length(capsules).dtype.name}


def mixed_bfloat16_capsnet(weights, batch_size: int = 16) -> tuple[CapsNet, list[str]]:
    """The package's CapsNet built under keras' 'mixed_bfloat16' policy, and its checks.

    As `experiment.py --mixed_bfloat16` builds it: conv1, the primary capsules'
    convolution and the votes compute in bfloat16; the layers route in float32,
    the lengths and the decoder are float32. Reported: each stage's dtype and the
    logits and loss against the float32 model on the same weights.
    """
    rng = np.random.default_rng(7)
    images = rng.random((batch_size, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, batch_size).astype(np.int32)
    float32 = make_model(CapsNet, weights).compute_losses((images, labels))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = make_model(CapsNet, weights)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed = model.compute_losses((images, labels))
    logit_diff = float(tf.reduce_max(tf.abs(mixed["logits"] - float32["logits"])))
    same_class = float(tf.reduce_mean(tf.cast(
        tf.argmax(mixed["logits"], -1) == tf.argmax(float32["logits"], -1), tf.float32)))
    return model, [
        f"package+bf16 dtypes: {_stage_dtypes(model, images)}",
        f"package+bf16 vs float32 on the same weights (batch {batch_size}): max |logit diff| "
        f"{logit_diff:.2e} (logits {float(tf.reduce_min(float32['logits'])):.3f}.."
        f"{float(tf.reduce_max(float32['logits'])):.3f}), same argmax {same_class:.3f}, loss "
        f"{float(mixed['loss']):.6f} vs {float(float32['loss']):.6f}",
    ]


def main(argv: list[str]) -> None:
    del argv
    f = FLAGS
    batch_sizes = [int(b) for b in f.batch_sizes]
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    start_time = time.perf_counter()

    package = make_model(CapsNet)
    weights = package.get_weights()
    models = {"package": package, "reference": make_model(ReferenceCapsNet, weights)}
    notes = []
    if f.jit_compile:
        models["package+xla"] = make_model(CapsNet, weights, jit_compile=True)
    if f.mixed_bfloat16:
        models["package+bf16"], lines = mixed_bfloat16_capsnet(weights)
        notes += lines

    gflops = matmul_gflops(f.matmul_size, f.matmul_iterations)
    flops = forward_flops(package)
    train_flops = 3 * sum(flops.values())
    eval_flops = sum(v for k, v in flops.items() if k != "decoder")

    results: dict[tuple[str, str, int], dict] = {}
    fit_rates: dict[str, float] = {}
    for round_index in range(f.rounds):
        for batch_size in batch_sizes:
            for mode, measure, steps in (("train", measure_train, f.train_steps),
                                         ("eval", measure_eval, f.eval_steps)):
                for name, model in models.items():
                    key = (name, mode, batch_size)
                    try:
                        # Memory is measured in the first round only.
                        result = measure(model, batch_size, f.warmup, steps,
                                         memory=round_index == 0)
                    except Exception as error:  # noqa: BLE001 - a failed variant is a result
                        result = {"error": _error_summary(error)}
                    previous = results.setdefault(key, result)
                    if "error" in previous and "error" not in result:
                        results[key] = result
                    elif result.get("images_per_s", 0) > previous.get("images_per_s", 0):
                        previous["images_per_s"] = result["images_per_s"]
                    print(f"  {name} {mode} batch {batch_size}: "
                          + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in result.items()), flush=True)
        calls = measure_fit_and_loop(package, batch_sizes[0], f.fit_steps)
        print(f"  package fit/keras_fit/loop batch {batch_sizes[0]}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in calls.items()), flush=True)
        for name, rate in calls.items():
            fit_rates[name] = max(fit_rates.get(name, 0.0), rate)

    # The ceiling is the best of a measurement before and one after the models ran.
    gflops = max(gflops, matmul_gflops(f.matmul_size, f.matmul_iterations))
    print()
    print("forward MFLOP per image: "
          + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in flops.items())
          + f"; training (3x forward) {train_flops / 1e9:.3f} GFLOP, "
          f"evaluation (logits) {eval_flops / 1e9:.3f} GFLOP")
    ceiling = gflops * 1e9 / train_flops
    print(f"matmul {f.matmul_size}x{f.matmul_size} float32: {gflops:.1f} GFLOP/s -> training "
          f"ceiling {ceiling:.1f} images/s, evaluation ceiling "
          f"{gflops * 1e9 / eval_flops:.1f} images/s")
    if f.mixed_bfloat16:
        print(f"matmul {f.matmul_size}x{f.matmul_size} bfloat16: "
              f"{matmul_gflops(f.matmul_size, f.matmul_iterations, tf.bfloat16):.1f} GFLOP/s "
              "(fraction_of_ceiling is against float32's, as for the package)")
    for note in notes:
        print(note)
    print()
    header = (f"{'model':<14}{'mode':<7}{'batch':>6}{'images/s':>10}{'vs_ref':>8}{'GFLOP/s':>9}"
              f"{'step_MiB':>10}{'tf_peak_MiB':>12}{'rss_MiB':>9}")
    print(header)
    print("-" * len(header))
    nan = float("nan")
    for (name, mode, batch_size), result in sorted(
            results.items(), key=lambda item: (item[0][1] != "train", -item[0][2])):
        if "error" in result:
            print(f"{name:<14}{mode:<7}{batch_size:>6}  {result['error']}")
            continue
        per_image = train_flops if mode == "train" else eval_flops
        versus = result["images_per_s"] / results[("reference", mode, batch_size)].get(
            "images_per_s", float("nan"))
        print(f"{name:<14}{mode:<7}{batch_size:>6}{result['images_per_s']:>10.1f}{versus:>8.2f}"
              f"{result['images_per_s'] * per_image / 1e9:>9.1f}"
              f"{result.get('step_MiB', nan):>10.0f}{result.get('tf_peak_MiB', nan):>12.0f}"
              f"{result.get('rss_MiB', nan):>9.0f}")
    print(f"\n{time.perf_counter() - start_time:.0f} s, load average at end "
          f"{os.getloadavg()[0]:.2f}")

    first = batch_sizes[0]
    print(f"\nfit row (package float32, batch {first}, {f.fit_steps} steps per call, whole "
          f"calls): model.fit {fit_rates['fit']:.1f} images/s, keras.Model.fit (no adapter) "
          f"{fit_rates['keras_fit']:.1f}, the package's own loop {fit_rates['loop']:.1f}")
    print(f"fit_vs_own_loop={fit_rates['fit'] / fit_rates['loop']:.3f} "
          f"keras_fit_vs_own_loop={fit_rates['keras_fit'] / fit_rates['loop']:.3f}")

    def rate(name, mode):
        return results[(name, mode, first)].get("images_per_s", float("nan"))

    def summary(name):
        return (f"train_ratio_vs_reference={rate(name, 'train') / rate('reference', 'train'):.3f}"
                f" fraction_of_ceiling={rate(name, 'train') / ceiling:.3f}"
                f" eval_ratio_vs_reference={rate(name, 'eval') / rate('reference', 'eval'):.3f}")

    # The variants first; the last line is the default float32 package's.
    for name in models:
        if name not in ("package", "reference"):
            print(f"{name}: {summary(name)}")
    print(summary("package"))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
