"""capsules.export: a weights-only copy of a training checkpoint."""

import numpy as np
import pytest
import tensorflow as tf

from capsules import CapsNet, checkpoints, default_hparams, training
from capsules.export import export_weights


def test_export_keeps_weights_and_drops_optimizer_state(tmp_path):
    hparams = default_hparams().replace(num_prime_capsules=2, routing=1)
    model = CapsNet(hparams)
    model.compile()
    model.optimizer.build(model.trainable_variables)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    checkpoints.write_run_file(str(train_dir), model, {"seed": 3})
    saved = training.checkpoint_manager(model, str(train_dir)).save(checkpoint_number=7)

    prefix = export_weights(saved, str(tmp_path / "shipped"))
    assert prefix.endswith("model.ckpt-7")
    assert tf.train.latest_checkpoint(str(tmp_path / "shipped")) == prefix
    names = [name for name, _ in tf.train.list_variables(prefix)]
    assert not any("optimizer" in name for name in names)
    assert any("decoder/recons_3" in name for name in names)

    assert checkpoints.read_run_file(prefix).flags == {"seed": 3}
    restored = checkpoints.load_model(prefix)
    images = np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(restored(images).numpy(), model(images).numpy())
    np.testing.assert_array_equal(restored.reconstruct(images, [1, 2]).numpy(),
                                  model.reconstruct(images, [1, 2]).numpy())

    # A compiled (and trained-on) model takes the weights-only checkpoint's weights; its
    # optimizer, which the checkpoint does not hold, keeps its state.
    compiled = CapsNet(checkpoints.read_run_file(prefix).hparams)
    compiled.compile()
    compiled.optimizer.build(compiled.trainable_variables)
    compiled.optimizer.iterations.assign(3)
    assert not np.array_equal(compiled(images).numpy(), model(images).numpy())
    checkpoints.restore_weights(compiled, prefix)
    np.testing.assert_array_equal(compiled(images).numpy(), model(images).numpy())
    assert int(compiled.optimizer.iterations) == 3
    mismatched = CapsNet(default_hparams().replace(num_prime_capsules=4, routing=1))
    mismatched.compile()
    with pytest.raises(ValueError, match="does not fit this model"):
        checkpoints.restore_weights(mismatched, prefix)


def test_export_can_rebuild_a_mixed_bfloat16_run_in_float32(tmp_path):
    model = CapsNet(default_hparams().replace(num_prime_capsules=2, routing=1),
                    dtype="mixed_bfloat16")
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    checkpoints.write_run_file(str(train_dir), model, {"mixed_bfloat16": True})
    saved = training.checkpoint_manager(model, str(train_dir)).save(checkpoint_number=5)

    as_trained = checkpoints.load_model(export_weights(saved, str(tmp_path / "bf16")))
    assert as_trained.dtype_policy.name == "mixed_bfloat16"
    prefix = export_weights(saved, str(tmp_path / "f32"), dtype="float32")
    run = checkpoints.read_run_file(prefix)
    assert run.config["dtype"]["config"]["name"] == "float32"
    # The run's flags stay the record of how it was trained.
    assert run.flags == {"mixed_bfloat16": True}
    restored = checkpoints.load_model(prefix)
    assert restored.get_layer("conv1").compute_dtype == "float32"
    for mine, theirs in zip(restored.weights, model.weights, strict=True):
        np.testing.assert_array_equal(mine, theirs)
