"""Input pipelines for MNIST, MultiMNIST, CIFAR10 and smallNORB (tf.data)."""

import importlib

# The modules of these names import TensorFlow: loaded on first use, so that a data tool
# (python -m input_data.X) quiets TensorFlow's logs before it is imported (capsules.tf_logs).
_MODULES = {"DatasetInfo": "capsules.datasets", "dataset_info": "capsules.datasets",
            "inputs": "input_data.reader", "read_error_line": "input_data.reader"}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'input_data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
