"""capsules.checkpoints: the run file, load_model from a path alone, older run files."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import input_data
from capsules import CapsNet, checkpoints, default_hparams, models
from capsules.errors import MissingFileError, UsageError

SMALL = default_hparams().replace(num_prime_capsules=1, routing=1)


def saved(directory, model, run_file=True) -> str:
    """`model` saved as directory/model.ckpt-1 (with its run file)."""
    directory.mkdir(exist_ok=True)
    if run_file:
        checkpoints.write_run_file(str(directory), model, {"seed": 1})
    return tf.train.Checkpoint(model=model).save(str(directory / "model.ckpt"))


def images(shape, n=2):
    return np.random.default_rng(0).random((n, *shape)).astype(np.float32)


def test_load_model_rebuilds_the_model_from_the_path_alone(tmp_path):
    model = CapsNet(SMALL, input_shape=(20, 20, 1), num_classes=4)
    prefix = saved(tmp_path / "run", model)
    content = json.loads((tmp_path / "run" / checkpoints.RUN_FILE).read_text())
    assert content["model"] == "capsule" and content["flags"] == {"seed": 1}
    assert content["config"]["input_shape"] == [20, 20, 1]
    loaded = checkpoints.load_model(prefix)
    assert (type(loaded), loaded.image_shape, loaded.num_classes, loaded.hparams) == (
        CapsNet, (20, 20, 1), 4, SMALL)
    np.testing.assert_array_equal(loaded(images((20, 20, 1))), model(images((20, 20, 1))))
    changed = checkpoints.load_model(prefix, "routing=2")
    assert changed.hparams.routing == 2
    with pytest.raises(UsageError, match="hparams_override: unknown hparam 'routingz'"):
        checkpoints.load_model(prefix, "routingz=2")
    with pytest.raises(MissingFileError, match="model.ckpt-9 not found"):
        checkpoints.load_model(str(tmp_path / "run" / "model.ckpt-9"))


def test_load_model_builds_in_the_trained_policy_or_the_one_asked_for(tmp_path):
    model = CapsNet(SMALL, dtype="mixed_bfloat16")
    prefix = saved(tmp_path / "run", model)
    assert checkpoints.load_model(prefix).dtype_policy.name == "mixed_bfloat16"
    float32 = checkpoints.load_model(prefix, dtype="float32")
    assert float32.dtype_policy.name == "float32"
    assert float32.get_layer("conv1").compute_dtype == "float32"
    for mine, theirs in zip(float32.weights, model.weights, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_an_older_run_file_loads_with_the_dataset_info(tmp_path):
    model = CapsNet(SMALL)
    prefix = saved(tmp_path, model, run_file=False)
    checkpoints.write_json_atomically(str(tmp_path / checkpoints.RUN_FILE),
                                      {"hparams": SMALL.to_dict(), "model": "capsule",
                                       "dataset": "mnist", "seed": 1})
    run = checkpoints.read_run_file(prefix)
    assert (run.model, run.config, run.hparams, run.flags) == (
        "capsule", None, SMALL, {"model": "capsule", "dataset": "mnist", "seed": 1})
    with pytest.raises(UsageError, match="predates the model config; give the dataset_info"):
        checkpoints.load_model(prefix)
    loaded = checkpoints.load_model(prefix, dataset_info=input_data.dataset_info("mnist"))
    np.testing.assert_array_equal(loaded(images((28, 28, 1))), model(images((28, 28, 1))))


class _Tiny(CapsNet):
    """Another model class, as a new model (e.g. EM routing's) registers itself."""


def test_any_model_in_the_registry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setitem(models.MODELS, "tiny", _Tiny)
    model = _Tiny(SMALL)
    prefix = saved(tmp_path, model)
    assert checkpoints.read_run_file(prefix).model == "tiny"
    assert type(checkpoints.load_model(prefix)) is _Tiny
    monkeypatch.delitem(models.MODELS, "tiny")
    with pytest.raises(UsageError, match="unknown model 'tiny'; expected one of: capsule"):
        checkpoints.load_model(prefix)
    with pytest.raises(ValueError, match="not in capsules.models.MODELS"):
        checkpoints.write_run_file(str(tmp_path), keras.Sequential())


def test_a_checkpoint_of_another_model_is_a_usage_error(tmp_path):
    prefix = saved(tmp_path, CapsNet(SMALL.replace(num_prime_capsules=2)))
    checkpoints.write_run_file(str(tmp_path), CapsNet(SMALL))  # the wrong run file
    with pytest.raises(UsageError, match="does not fit this model"):
        checkpoints.load_model(prefix)
