"""Hyper-parameters of the EM capsule network (EMCapsNet): a recipe that learns, the official
capsule_em numbers one preset away."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from capsules.hparams import ValidatedHParams


@dataclasses.dataclass(frozen=True)
class EMHParams(ValidatedHParams):
    """EMCapsNet's hyper-parameters.

    The defaults are the official experiment.py flags' except where the official numbers
    barely learn (measured on MNIST: docs/em_routing.md, "The recipe that learns", and
    benchmarks/README.md, "EM recipe probes"): the variance floor, the transformation
    matrices' initial scale, the routing iterations and the weights' moving average for
    evaluation (the class layer's cost scale and batch normalisation after conv1 are fields
    at their official values). `preset=smallnorb_official`
    (`EMHParams.preset("smallnorb_official")`) restores every official value;
    `preset=mnist_small` is the paper's small model (A=64, B=8, C=D=16) with the defaults.

    Attributes:
      conv1_channels, primary_capsules, conv_capsules1, conv_capsules2: A, B, C and D
        of the paper (32 each, 316,650 parameters on smallNORB; the paper's small
        model is 64, 8, 16, 16).
      routing: EM iterations of the three routed layers (the official 3).
      final_lambda: final inverse temperature of the convolutional capsule layers: 0.02,
        the official --final_beta=0.01 applied to its cost in ln sigma^2, twice the
        paper's ln sigma used here, so that the activation logits are the official's.
      class_final_lambda: that of the class capsules (the official final_beta / 4, doubled
        likewise).
      coordinate_addition: add the voters' scaled positions to the class votes.
      margin_start, margin_end, margin_steps: the spread loss's margin rises linearly
        from margin_start to margin_end over margin_steps training steps, then stays
        (the paper: 0.2 to 0.9; the official sigmoid passes 0.9 near step 300,000).
      weight_decay: times sum(w^2) / 2 of every kernel (not of biases or betas), added
        to the loss (2e-7).
      learning_rate, decay_rate, decay_steps: Adam's learning rate is
        learning_rate * decay_rate^(step / decay_steps) (0.01, 0.96, 20,000).
      gradient_clip: every gradient element is clipped to [-gradient_clip, gradient_clip] (200).
      variance_floor: added to every variance in the routing (the official 0.0005, against
        which the class votes of the official initial scale vanish).
      class_cost_scale: the class layer counts each class's mass this many times in its
        cost (1: the paper and the official code; IBM's port 100 / (children / classes)).
      conv_kernel_stddev, class_kernel_stddev: initial transformation matrices, truncated
        normal (the official 0.3 and 0.01; the PyTorch ports draw N(0, 1)).
      conv1_batch_norm: batch normalisation between conv1 and its ReLU (without conv1's bias),
        its statistics over the global batch when training is distributed (the official:
        none, conv1 with a bias; the yl-1993 PyTorch port's).
      ema_momentum: the weights that evaluation, `load_model` and exports use are their
        moving average, average = ema_momentum * average + (1 - ema_momentum) * weights
        after every step (Keras' optimizer `use_ema`: training steps use the weights
        themselves, and `model.fit` puts the average into them when it ends); 0: the
        weights themselves (the official code keeps no average).
    """

    conv1_channels: int = 32
    primary_capsules: int = 32
    conv_capsules1: int = 32
    conv_capsules2: int = 32
    routing: int = 2
    final_lambda: float = 0.02
    class_final_lambda: float = 0.005
    coordinate_addition: bool = True
    margin_start: float = 0.2
    margin_end: float = 0.9
    margin_steps: int = 300_000
    weight_decay: float = 2e-7
    learning_rate: float = 0.01
    decay_rate: float = 0.96
    decay_steps: int = 20_000
    gradient_clip: float = 200.0
    variance_floor: float = 1e-8
    class_cost_scale: float = 1.0
    conv_kernel_stddev: float = 2.0
    class_kernel_stddev: float = 1.0
    conv1_batch_norm: bool = False
    ema_momentum: float = 0.99

    # The official capsule_em values of the fields whose defaults depart from them.
    _OFFICIAL: ClassVar[dict] = {
        "routing": 3, "variance_floor": 0.0005, "class_cost_scale": 1.0,
        "conv_kernel_stddev": 0.3, "class_kernel_stddev": 0.01, "ema_momentum": 0.0,
    }
    # Run files written before the moving average existed trained without one.
    ADDED_FIELDS: ClassVar[dict] = {"ema_momentum": 0.0}
    PRESETS: ClassVar[dict[str, dict]] = {
        "smallnorb_official": _OFFICIAL,
        "mnist_small": {"conv1_channels": 64, "primary_capsules": 8, "conv_capsules1": 16,
                        "conv_capsules2": 16},
    }

    _POSITIVE: ClassVar[tuple] = (
        "conv1_channels", "primary_capsules", "conv_capsules1", "conv_capsules2", "routing",
        "final_lambda", "class_final_lambda", "margin_steps", "learning_rate", "decay_rate",
        "decay_steps", "gradient_clip", "variance_floor", "class_cost_scale",
        "conv_kernel_stddev", "class_kernel_stddev",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.margin_start <= self.margin_end:
            raise ValueError(
                f"hparams margin_start={self.margin_start!r}, margin_end={self.margin_end!r}: "
                "expected 0 <= margin_start <= margin_end"
            )
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(
                f"hparam ema_momentum={self.ema_momentum!r}: expected 0 <= ema_momentum < 1 "
                "(0: no moving average)"
            )
        if self.weight_decay < 0:
            raise ValueError(f"hparam weight_decay={self.weight_decay!r}: must be >= 0")
