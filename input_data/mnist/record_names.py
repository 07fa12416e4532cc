"""The MNIST record files: their splits and names, shared by the generator and the reader.

`mnist_shift.py` writes `{split}_{shift}shifted_mnist.tfrecords` (the validation splits
`..._valid.tfrecords`, MultiMNIST shards `multi...`), the names of the reference's files;
`mnist_input_record.py` reads them.
"""

from __future__ import annotations

from capsules.errors import UsageError
from input_data.mnist import idx

# split -> (source IDX files, range of images used, None: to the end); the validation
# splits hold out the first 10,000 training images, as the reference does.
SPLITS = {
    "train": (idx.TRAIN_FILES, (0, None)),
    "test": (idx.TEST_FILES, (0, None)),
    "valid_train": (idx.TRAIN_FILES, (10000, None)),
    "valid_test": (idx.TRAIN_FILES, (0, 10000)),
}
TRAIN_SHIFT = 2
"""The shift of the reference's training file (train_2shifted_mnist.tfrecords)."""
GENERATOR = "python input_data/mnist/mnist_shift.py"
"""The command that writes the records (named in the readers' errors)."""


def record_name(split: str, shift: int, multi_targets: bool = False) -> str:
    """The file name (the shard prefix for MultiMNIST) of a split's records."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    name = f"{split.removeprefix('valid_')}_{shift}shifted_mnist"
    name += "_valid.tfrecords" if split.startswith("valid_") else ".tfrecords"
    return "multi" + name if multi_targets else name
