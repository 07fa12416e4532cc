"""One check that every capsule layer goes through (in the manner of keras-hub's TestCase).

`run_layer_test` builds the layer, checks the output shape against
`compute_output_shape`, round-trips the config, saves and reloads a model
holding the layer as `.keras` with equal outputs, runs a fit step that
changes the weights, and runs Keras' mixed-precision check (under
"mixed_bfloat16" the weights stay float32 and each output has the dtype
`compute_output_spec` gives). Inputs and outputs may be single tensors or
lists/tuples of them (then `expected_output_shape` is a tuple of shapes).
"""

from __future__ import annotations

import os

import keras
import numpy as np


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def run_layer_test(layer_cls, init_kwargs: dict, inputs, expected_output_shape: tuple,
                   tmp_path) -> keras.layers.Layer:
    """Runs the shared checks and returns the built layer."""
    inputs = _as_list(inputs)
    single = len(inputs) == 1
    several_outputs = isinstance(expected_output_shape[0], (list, tuple))
    expected = [tuple(shape) for shape in
                (expected_output_shape if several_outputs else [expected_output_shape])]
    layer = layer_cls(**init_kwargs)
    outputs = _as_list(layer(inputs[0] if single else inputs))
    assert [tuple(output.shape) for output in outputs] == expected
    input_shapes = [tuple(x.shape) for x in inputs]
    predicted = layer.compute_output_shape(input_shapes[0] if single else input_shapes)
    assert [tuple(shape) for shape in (predicted if several_outputs else [predicted])] == expected

    # Config round trip: every constructor argument survives.
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config

    # A model holding the layer saves and loads as .keras with equal outputs.
    symbolic = [keras.Input(shape=x.shape[1:], batch_size=None) for x in inputs]
    model = keras.Model(symbolic, layer_cls(**init_kwargs)(symbolic[0] if single else symbolic))
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for reloaded, original in zip(_as_list(loaded(inputs)), _as_list(model(inputs)),
                                  strict=True):
        np.testing.assert_allclose(np.asarray(reloaded), np.asarray(original), rtol=1e-6,
                                   atol=1e-6)

    # One fit step runs; it changes the weights (if any) and leaves them finite.
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    target = [np.zeros_like(np.asarray(output)) + 0.5 for output in _as_list(model(inputs))]
    target = target if several_outputs else target[0]
    history = model.fit(inputs, target, epochs=1, batch_size=len(inputs[0]), verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = model.get_weights()
    assert all(np.all(np.isfinite(w)) for w in after)
    if before:
        assert any(not np.allclose(a, b) for a, b in zip(after, before, strict=True))

    _check_mixed_precision(layer_cls, init_kwargs, inputs)
    return layer


def _check_mixed_precision(layer_cls, init_kwargs: dict, inputs: list) -> None:
    """Keras' mixed-precision layer check (keras.src.testing.TestCase.run_layer_test)."""
    layer = layer_cls(**{**init_kwargs, "dtype": "mixed_bfloat16"})
    specs = [
        keras.KerasTensor(x.shape, dtype=layer.compute_dtype
                          if layer.autocast and np.issubdtype(x.dtype, np.floating) else x.dtype)
        for x in inputs
    ]
    single = len(inputs) == 1
    outputs = layer(inputs[0] if single else inputs)
    expected = layer.compute_output_spec(specs[0] if single else specs)
    for output, spec in zip(_as_list(outputs), _as_list(expected), strict=True):
        dtype = keras.backend.standardize_dtype(output.dtype)
        assert dtype == spec.dtype, f"output dtype {dtype}, compute_output_spec {spec.dtype}"
    for weight in layer.weights:
        assert weight.dtype == "float32", weight.path
