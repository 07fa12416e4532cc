"""Input pipelines for MNIST, MultiMNIST, CIFAR10 and smallNORB (tf.data)."""

from capsules.datasets import DatasetInfo, dataset_info
from input_data.reader import inputs, read_error_line

__all__ = ["DatasetInfo", "dataset_info", "inputs", "read_error_line"]
