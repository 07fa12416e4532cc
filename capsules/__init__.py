"""Capsule networks ("Dynamic Routing Between Capsules") for TensorFlow 2 and Keras 3."""

from capsules.hparams import HParams, default_hparams, parse_overrides

__all__ = ["CapsNet", "ConvBaseline", "HParams", "default_hparams", "parse_overrides"]


def __getattr__(name: str):
    # The models import TensorFlow: loaded on first use, so that a command (python -m
    # capsules.X) quiets TensorFlow's logs before it is imported (capsules.tf_logs).
    if name in ("CapsNet", "ConvBaseline"):
        from capsules import models

        return getattr(models, name)
    raise AttributeError(f"module 'capsules' has no attribute {name!r}")
