"""How this checkpoint's training resumed from a weights-only checkpoint (a provenance record).

  python checkpoints/mnist/warm_start.py SOURCE TRAIN_DIR DATA_DIR
  e.g. checkpoints/mnist/model.ckpt-4000 (in git history) runs/mnist/train data/mnist

The run's optimizer state was lost with the machine it ran on; only the weights-only
export of step 4,000 was left. This writes TRAIN_DIR/model.ckpt-STEP, a training
checkpoint that `experiment.py --summary_dir=...` resumes from: the weights of SOURCE,
the optimizer step set to SOURCE's (so the learning rate goes on decaying from there),
Adam's first moments zero and its second moments the mean squared gradient of 20
training batches. Zero second moments with a step-4,000 bias correction (about 1)
would make the first updates several times the learning rate.
"""

import sys

import tensorflow as tf

import input_data
from capsules import checkpoints
from capsules.training import checkpoint_manager

NUM_BATCHES = 20


def main(source: str, train_dir: str, data_dir: str) -> None:
    model = checkpoints.load_model(source)  # uncompiled: the weights only
    model.compile()
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    dataset = input_data.inputs("mnist", "train", data_dir, batch_size=128, random_shift=2,
                                repeat=True, seed=3)

    @tf.function
    def gradients(features):
        with tf.GradientTape() as tape:
            loss = model.compute_losses(features, training=True)["loss"]
        return tape.gradient(loss, model.trainable_variables)

    squares = [tf.zeros_like(variable) for variable in model.trainable_variables]
    for features in dataset.take(NUM_BATCHES):
        squares = [square + tf.square(gradient) / NUM_BATCHES
                   for square, gradient in zip(squares, gradients(features), strict=True)]
    for variable, square in zip(model.trainable_variables, squares, strict=True):
        # Keras 3's Adam keeps its second moments in `_velocities`, one per variable.
        optimizer._velocities[optimizer._get_variable_index(variable)].assign(square)
    step = checkpoints.checkpoint_step(source)
    optimizer.iterations.assign(step)
    print(checkpoint_manager(model, train_dir).save(checkpoint_number=step))


if __name__ == "__main__":
    main(*sys.argv[1:4])
