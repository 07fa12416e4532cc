"""Static facts about each data set as the readers deliver it: what a model of it is built for.

Here, not in input_data, so that rebuilding a model (export, load_model) needs no input
pipeline; input_data re-exports them.
"""

from __future__ import annotations

import dataclasses

from capsules.errors import UsageError

DATASETS = ("mnist", "multimnist", "cifar10", "norb")
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Shape of the `images` the readers yield ([batch, height, width, depth]) and targets."""

    height: int
    width: int
    depth: int
    num_classes: int
    num_targets: int


def check_name(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raises UsageError listing the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise UsageError(f"unknown {kind} {value!r}; expected one of: {', '.join(allowed)}")


def dataset_info(dataset: str, num_targets: int | None = None,
                 distort: bool = False) -> DatasetInfo:
    """The static image shape, class count and target count of `inputs(...)`'s batches.

    mnist: 28x28x1, 24x24x1 with distort, MultiMNIST records (num_targets=2) 36x36x1;
    multimnist (pairs made on the fly, num_targets 2): 36x36x1; cifar10: 24x24x3; norb:
    32x32x2 with 5 classes. num_targets None: the data set's (2 for multimnist, else 1).
    `distort` changes only single-digit MNIST (cifar10 and norb always get the
    reference's crops).
    """
    check_name("dataset", dataset, DATASETS)
    if dataset == "multimnist":
        if num_targets not in (None, 2) or distort:
            raise UsageError(f"multimnist: num_targets={num_targets}, distort={distort}; "
                             "expected num_targets=2 and no distort")
        return DatasetInfo(36, 36, 1, 10, 2)
    num_targets = 1 if num_targets is None else num_targets
    if num_targets not in (1, 2) or (num_targets == 2 and dataset != "mnist"):
        raise UsageError(f"num_targets={num_targets}: expected 1, or 2 for mnist (MultiMNIST)")
    if num_targets == 2 and distort:
        raise UsageError("distort applies to single-digit MNIST only, not MultiMNIST")
    if dataset == "cifar10":
        return DatasetInfo(24, 24, 3, 10, 1)
    if dataset == "norb":
        return DatasetInfo(32, 32, 2, 5, 1)
    size = 36 if num_targets == 2 else 24 if distort else 28
    return DatasetInfo(size, size, 1, 10, num_targets)
