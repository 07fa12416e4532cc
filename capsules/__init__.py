"""Capsule networks ("Dynamic Routing Between Capsules") for TensorFlow 2 and Keras 3."""

from capsules.hparams import HParams, default_hparams, parse_overrides
from capsules.models import CapsNet, ConvBaseline

__all__ = ["CapsNet", "ConvBaseline", "HParams", "default_hparams", "parse_overrides"]
