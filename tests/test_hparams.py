"""Hyper-parameters: the reference's defaults and --hparams_override parsing."""

import pytest

from capsules import HParams, default_hparams, parse_overrides


def test_defaults_are_the_references():
    assert default_hparams().to_dict() == {
        "decay_rate": 0.96, "decay_steps": 2000, "leaky": False, "learning_rate": 0.001,
        "loss_type": "margin", "num_prime_capsules": 32, "padding": "VALID", "remake": True,
        "routing": 3, "verbose": False, "loss_form": "reference",
    }


def test_parse_overrides_returns_new_hparams():
    base = default_hparams()
    parsed = parse_overrides(base, "num_prime_capsules=64,padding=SAME,leaky=true,remake=false")
    assert (parsed.num_prime_capsules, parsed.padding, parsed.leaky, parsed.remake) == (
        64, "SAME", True, False)
    assert base == default_hparams()
    assert parse_overrides(base, "learning_rate=1e-4").learning_rate == 1e-4
    assert parse_overrides(base, "") is base


@pytest.mark.parametrize(
    "overrides,message",
    [
        ("routing_iterations=3", "unknown hparam 'routing_iterations'; allowed: decay_rate"),
        ("routing=three", "routing='three': expected int"),
        ("leaky=maybe", "leaky='maybe': expected true or false"),
        ("padding=FULL", "padding='FULL': allowed values are VALID, SAME"),
        ("routing=0", "routing=0: must be > 0"),
        ("learning_rate=0", "learning_rate=0.0: must be > 0"),
        ("learning_rate=-1e-3", "learning_rate=-0.001: must be > 0"),
        ("learning_rate=inf", "learning_rate=inf: must be finite"),
        ("learning_rate=nan", "learning_rate=nan: must be finite"),
        ("decay_rate=-inf", "decay_rate=-inf: must be finite"),
        ("routing", "'routing': expected key=value"),
        ("loss_form=blog", "loss_form='blog'"),
        ("preset=mnist_small", "unknown hparam 'preset'"),  # CapsNet has no presets
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_overrides(default_hparams(), overrides)


def test_wrong_types_in_the_constructor_raise():
    with pytest.raises(ValueError, match="routing"):
        HParams(routing=2.5)
