"""Hyper-parameters of the capsule experiments, the reference's `default_hparams`."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar


class ValidatedHParams:
    """Checks shared by the hyper-parameter dataclasses (HParams, EMHParams).

    A frozen dataclass subclass declares its fields with defaults (whose types
    are the expected ones), `_CHOICES` (field -> allowed values), `_POSITIVE`
    (fields that must be > 0), `PRESETS` (name -> the fields that differ from the
    defaults in that named set, chosen with `preset=NAME` in the overrides) and
    `ADDED_FIELDS` (fields added after run files were first written -> the value that
    reproduces the runs of files without them).
    """

    _CHOICES: ClassVar[dict] = {}
    _POSITIVE: ClassVar[tuple] = ()
    ADDED_FIELDS: ClassVar[dict] = {}
    PRESETS: ClassVar[dict[str, dict]] = {}

    @classmethod
    def from_dict(cls, values: dict):
        """The hyper-parameters saved as `values` (`to_dict`, in a run file or a model's
        config); a field they predate takes its `ADDED_FIELDS` value, how their run trained."""
        return cls(**{**cls.ADDED_FIELDS, **values})

    @classmethod
    def preset(cls, name: str):
        """The hyper-parameters of the preset `name` (ValueError naming the known ones)."""
        if name not in cls.PRESETS:
            known = ", ".join(cls.PRESETS) or "none"
            raise ValueError(f"hparam preset={name!r}: unknown preset; {cls.__name__} has: "
                             f"{known}")
        return cls(**cls.PRESETS[name])

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = _field_type(type(self), field.name)
            if expected is float and type(value) is int:
                value = float(value)
                object.__setattr__(self, field.name, value)
            if type(value) is not expected:
                raise ValueError(
                    f"hparam {field.name}={value!r}: expected {expected.__name__}"
                )
        for name, allowed in self._CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"hparam {name}={getattr(self, name)!r}: allowed values are "
                    + ", ".join(allowed)
                )
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is float and not math.isfinite(value):
                raise ValueError(f"hparam {field.name}={value!r}: must be finite")
        for name in self._POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"hparam {name}={getattr(self, name)!r}: must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        """A copy with `changes`; an unknown name raises ValueError listing the known ones."""
        names = _names(type(self))
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(
                f"unknown hparam {', '.join(unknown)}; allowed: {', '.join(names)}"
            )
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class HParams(ValidatedHParams):
    """The reference's hyper-parameters (experiment.py `default_hparams`), plus `loss_form`.

    Attributes:
      decay_rate, decay_steps, learning_rate: Adam's learning rate is
        learning_rate * decay_rate^(step / decay_steps), floored at 1e-6.
      leaky: leaky routing (an extra zero logit that absorbs poorly fitting votes).
      loss_type: 'margin' (capsule lengths), 'softmax' or 'sigmoid' (two targets).
      num_prime_capsules: capsule types in the primary capsule layer (32; CIFAR10 64).
      padding: 'VALID' or 'SAME' for conv1 and the primary capsules.
      remake: add the reconstruction decoder and its loss.
      routing: routing iterations of the class capsules.
      verbose: write extra summaries (histograms, reconstructions).
      loss_form: 'reference' averages the margin costs over batch and classes (the
        released code); 'paper' sums eq. 4 over classes, which weights the
        reconstruction term 20x less relative to the margin term.
    """

    decay_rate: float = 0.96
    decay_steps: int = 2000
    leaky: bool = False
    learning_rate: float = 0.001
    loss_type: str = "margin"
    num_prime_capsules: int = 32
    padding: str = "VALID"
    remake: bool = True
    routing: int = 3
    verbose: bool = False
    loss_form: str = "reference"

    _CHOICES: ClassVar[dict] = {
        "loss_type": ("margin", "softmax", "sigmoid"),
        "padding": ("VALID", "SAME"),
        "loss_form": ("reference", "paper"),
    }
    _POSITIVE: ClassVar[tuple] = (
        "decay_rate", "decay_steps", "learning_rate", "num_prime_capsules", "routing"
    )


# The override key that chooses a named set of hyper-parameters.
PRESET = "preset"


def _names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def _field_type(cls: type, name: str) -> type:
    return type(getattr(cls, name))


def default_hparams() -> HParams:
    """The reference's defaults (experiment.py `default_hparams`)."""
    return HParams()


def _parse_value(cls: type, name: str, text: str):
    expected = _field_type(cls, name)
    if expected is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"hparam {name}={text!r}: expected true or false")
        return lowered in ("true", "1")
    try:
        return expected(text.strip())
    except ValueError:
        raise ValueError(f"hparam {name}={text!r}: expected {expected.__name__}") from None


def parse_overrides(hparams: ValidatedHParams, overrides: str | None) -> ValidatedHParams:
    """Applies "key=value,key=value" (the reference's --hparams_override) to `hparams`.

    `preset=NAME`, wherever it stands, first replaces every field with the preset's
    (`ValidatedHParams.PRESETS`); the other pairs then apply to it.
    Returns new HParams; raises ValueError naming the key for an unknown key or
    preset, a malformed pair or a value of the wrong type or out of range.
    """
    if not overrides:
        return hparams
    cls = type(hparams)
    changes, preset = {}, None
    for pair in overrides.split(","):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"hparams override {pair!r}: expected key=value")
        names = _names(cls) + ([PRESET] if cls.PRESETS else [])
        if key not in names:
            raise ValueError(f"unknown hparam {key!r}; allowed: {', '.join(names)}")
        if key == PRESET:
            preset = value.strip()
        else:
            changes[key] = _parse_value(cls, key, value)
    return (cls.preset(preset) if preset else hparams).replace(**changes)
