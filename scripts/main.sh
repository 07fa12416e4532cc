#!/usr/bin/env bash
# The main job on a fresh machine: install, fetch real MNIST, build the test records and
# evaluate the shipped checkpoint on all 10,000 test images.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
DATA_DIR=${DATA_DIR:-data/mnist}
.venv/bin/python -m input_data.mnist.fetch --data_dir="$DATA_DIR"
if [ ! -f "$DATA_DIR/test_0shifted_mnist.tfrecords" ]; then
  .venv/bin/python input_data/mnist/mnist_shift.py --data_dir="$DATA_DIR" --split=test --shift=0
fi
CHECKPOINT=$(.venv/bin/python -c 'import tensorflow as tf; print(tf.train.latest_checkpoint("checkpoints/mnist"))' 2>/dev/null)
.venv/bin/python experiment.py --data_dir="$DATA_DIR" --train=false --checkpoint="$CHECKPOINT"
