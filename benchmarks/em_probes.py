"""Short EMCapsNet training probes on real MNIST: which recipe learns, and how fast.

Each variant (a name and `--hparams_override` text applied on top of --base) trains the
same model from the same seed on the same batches (training images 10,000..60,000 shifted
at random within +-2 pixels, the `--validate` split of experiment.py), and its error on the
first --eval_size validation images (training images 0..10,000) is measured every
--eval_every steps, with the weights that evaluating a checkpoint of that step uses (their
moving average under the default `ema_momentum`). Each variant runs in a process of its own.

  python benchmarks/em_probes.py --data_dir=data/mnist \\
      --variant=official:preset=smallnorb_official,routing=3 --variant=default: --steps=1000

The last lines are a markdown table: variant, overrides, the error at each evaluated step,
seconds per step. data_dir needs the validation records (`python
input_data/mnist/mnist_shift.py --data_dir=DIR --split=valid_train --shift=0` and
`--split=valid_test --shift=0`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
SMALL = "conv1_channels=64,primary_capsules=8,conv_capsules1=16,conv_capsules2=16"


def probe(overrides: str, data_dir: str, steps: int, eval_every: int, eval_size: int,
          batch_size: int, seed: int) -> dict:
    """Trains one variant in this process; returns {step: validation error} and timing."""
    import keras
    import numpy as np
    import tensorflow as tf

    import input_data
    from capsules.em_hparams import EMHParams
    from capsules.hparams import parse_overrides
    from capsules.models import EMCapsNet

    keras.utils.set_random_seed(seed)
    hparams = parse_overrides(EMHParams(), overrides)
    model = EMCapsNet(hparams, input_shape=(28, 28, 1), num_classes=10)
    model.compile()
    train = input_data.inputs("mnist", "train", data_dir, batch_size, validate=True,
                              random_shift=2, repeat=True, seed=seed)
    valid = input_data.inputs("mnist", "test", data_dir, 100, validate=True).take(
        -(-eval_size // 100)).cache()
    step_fn = tf.function(model.optimize_step)
    predict = tf.function(lambda images: model(images, training=False))

    def error() -> float:
        # The weights that load_model gives a checkpoint of this step: their moving average
        # where the hparams keep one (ema_momentum).
        trained = [weight.numpy() for weight in model.trainable_weights]
        model.optimizer.finalize_variable_values(model.trainable_weights)
        wrong = total = 0
        for batch in valid:
            logits = predict(batch["images"]).numpy()
            wrong += int(np.sum(np.argmax(logits, 1) != np.argmax(batch["labels"].numpy(), 1)))
            total += len(logits)
        for weight, value in zip(model.trainable_weights, trained, strict=True):
            weight.assign(value)
        return wrong / total

    errors, losses, seconds = {}, {}, 0.0
    batches = iter(train)
    for step in range(1, steps + 1):
        features = next(batches)
        start = time.perf_counter()
        results = step_fn(features)
        loss = float(results["loss"])
        seconds += time.perf_counter() - start
        if not np.isfinite(loss):
            errors[step] = float("nan")
            break
        if step % eval_every == 0 or step == steps:
            errors[step], losses[step] = error(), loss
            print(f"step {step}: validation error {errors[step]:.2%}, loss {loss:.4f}",
                  file=sys.stderr, flush=True)
    return {"errors": errors, "losses": losses, "seconds_per_step": seconds / step}


def main(argv):
    del argv
    rows = []
    for variant in FLAGS.variant:
        name, _, overrides = variant.partition(":")
        overrides = ",".join(part for part in (FLAGS.base, overrides) if part)
        command = [sys.executable, os.path.abspath(__file__), f"--child={overrides}",
                   f"--data_dir={FLAGS.data_dir}", f"--steps={FLAGS.steps}",
                   f"--eval_every={FLAGS.eval_every}", f"--eval_size={FLAGS.eval_size}",
                   f"--batch_size={FLAGS.batch_size}", f"--seed={FLAGS.seed}"]
        print(f"== {name}: {overrides}", flush=True)
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        if result.returncode:
            print(f"{name}: failed (exit {result.returncode})", flush=True)
            continue
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{name}: {outcome}", flush=True)
        rows.append((name, overrides, outcome))
    steps = sorted({int(s) for _, _, o in rows for s in o["errors"]})
    print("| variant | overrides | " + " | ".join(f"step {s}" for s in steps) + " | s/step |")
    print("| --- | --- | " + " | ".join("---" for _ in steps) + " | --- |")
    for name, overrides, outcome in rows:
        cells = [f"{outcome['errors'][str(s)]:.1%}" if str(s) in outcome["errors"] else ""
                 for s in steps]
        print(f"| {name} | `{overrides}` | " + " | ".join(cells)
              + f" | {outcome['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    flags.DEFINE_multi_string("variant", ["default:"], "NAME:OVERRIDES, OVERRIDES applied "
                              "after --base (repeat the flag for several variants).")
    flags.DEFINE_string("base", f"{SMALL},routing=2", "Overrides every variant starts from "
                        "(default: the paper's small model, 2 routing iterations).")
    flags.DEFINE_string("data_dir", "data/mnist", "MNIST records with the validation split.")
    flags.DEFINE_integer("steps", 500, "Training steps per variant.")
    flags.DEFINE_integer("eval_every", 100, "Steps between validation measurements.")
    flags.DEFINE_integer("eval_size", 2000, "Validation images measured.")
    flags.DEFINE_integer("batch_size", 64, "Images per step.")
    flags.DEFINE_integer("seed", 3, "Seed of the weights and batches (the same for all).")
    flags.DEFINE_string("child", None, "Internal: train the variant with these overrides.")

    def entry(argv):
        if FLAGS.child is not None:
            print(json.dumps(probe(FLAGS.child, FLAGS.data_dir, FLAGS.steps, FLAGS.eval_every,
                                   FLAGS.eval_size, FLAGS.batch_size, FLAGS.seed)))
        else:
            main(argv)

    app.run(entry)
