"""What `tf.config.experimental.enable_op_determinism()` costs, and whether training needs it.

For CapsNet (MNIST, default hparams) and the paper's small EMCapsNet (A=64, B=8, C=D=16, MNIST),
each in fresh processes, `--runs` times with TensorFlow's op determinism off and on, alternating:
the same seed (`keras.utils.set_random_seed`), the same random batches, --warmup untimed and
--steps timed training steps of `model.fit`. Prints per model and mode the best images/s and a
hash of the weights after training; the last line per model is

  MODEL: determinism_cost=X equal_runs_off=B1 equal_runs_on=B2 equal_off_on=B3

with X = images/s off / images/s on, B1 (B2) whether every run with determinism off (on) ended
with bit-equal weights, B3 whether both modes did.

  python benchmarks/determinism.py   # about 3 minutes on an idle 2-core CPU
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
MODELS = {
    "capsnet": ("capsule", "", 32),
    "emcapsnet": ("em", "conv1_channels=64,primary_capsules=8,conv_capsules1=16,"
                        "conv_capsules2=16,routing=2", 64),
}


def one_run(model_name: str, deterministic: bool, warmup: int, steps: int) -> dict:
    """Trains in this process; returns images/s and the weights' hash."""
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from capsules.hparams import parse_overrides
    from capsules.models import MODELS as REGISTRY
    from capsules.models import build_model
    from input_data import dataset_info

    if deterministic:
        tf.config.experimental.enable_op_determinism()
    name, overrides, batch_size = MODELS[model_name]
    keras.utils.set_random_seed(1)
    model = build_model(name, parse_overrides(REGISTRY[name].hparams_class(), overrides),
                        dataset_info("mnist", 1, False))
    model.compile()
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(batch_size * 4, 28, 28, 1)).astype("float32")
    labels = rng.integers(0, 10, batch_size * 4)
    model.fit(images, labels, batch_size=batch_size, epochs=1, steps_per_epoch=warmup,
              shuffle=False, verbose=0)
    start = time.perf_counter()
    model.fit(images, labels, batch_size=batch_size, epochs=1, steps_per_epoch=steps,
              shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()
    return {"images_per_second": batch_size * steps / seconds, "weights": digest[:16]}


def main(argv):
    del argv
    for model_name in FLAGS.models:
        results = {False: [], True: []}
        for _ in range(FLAGS.runs):
            for deterministic in (False, True):
                command = [sys.executable, os.path.abspath(__file__), "--child", model_name,
                           f"--deterministic={deterministic}", f"--warmup={FLAGS.warmup}",
                           f"--steps={FLAGS.steps}"]
                output = subprocess.run(command, check=True, capture_output=True, text=True,
                                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout
                result = json.loads(output.strip().splitlines()[-1])
                results[deterministic].append(result)
                mode = "on " if deterministic else "off"
                print(f"{model_name} determinism {mode}: {result['images_per_second']:.1f} "
                      f"images/s, weights {result['weights']}", flush=True)
        best = {mode: max(r["images_per_second"] for r in runs) for mode, runs in results.items()}
        hashes = {mode: {r["weights"] for r in runs} for mode, runs in results.items()}
        print(f"{model_name}: determinism_cost={best[False] / best[True]:.3f} "
              f"equal_runs_off={len(hashes[False]) == 1} equal_runs_on={len(hashes[True]) == 1} "
              f"equal_off_on={hashes[False] == hashes[True] and len(hashes[False]) == 1}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    flags.DEFINE_list("models", list(MODELS), f"Models to measure, of {list(MODELS)}.")
    flags.DEFINE_integer("runs", 2, "Runs per mode (fresh processes, alternating).")
    flags.DEFINE_integer("warmup", 3, "Untimed training steps (tracing) per run.")
    flags.DEFINE_integer("steps", 10, "Timed training steps per run.")
    flags.DEFINE_string("child", None, "Internal: run one measurement of this model.")
    flags.DEFINE_boolean("deterministic", False, "Internal: the child's mode.")

    def entry(argv):
        if FLAGS.child:
            print(json.dumps(one_run(FLAGS.child, FLAGS.deterministic, FLAGS.warmup,
                                     FLAGS.steps)))
        else:
            main(argv)

    app.run(entry)
