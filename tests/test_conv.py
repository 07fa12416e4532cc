"""capsules.conv.patch_conv2d computes tf.nn.conv2d's values and gradients."""

import numpy as np
import pytest
import tensorflow as tf

from capsules import conv


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _numpy_patches(x, kernel_size, strides):
    """im2col written as loops: `[batch * out_h * out_w, k * k * channels]`, VALID."""
    batch, height, width, _ = x.shape
    rows = []
    for b in range(batch):
        for oy in range((height - kernel_size) // strides + 1):
            for ox in range((width - kernel_size) // strides + 1):
                y, z = oy * strides, ox * strides
                rows.append(x[b, y:y + kernel_size, z:z + kernel_size].reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("height,width,kernel_size,strides", [(20, 20, 9, 2), (7, 9, 3, 1),
                                                              (8, 6, 5, 2), (4, 4, 4, 3)])
def test_patch_indices_gather_the_receptive_fields(height, width, kernel_size, strides):
    x = _random((2, height, width, 3), 0)
    indices = conv.patch_indices(height, width, kernel_size, strides)
    gathered = x.reshape(2, height * width, 3)[:, indices].reshape(-1, kernel_size**2 * 3)
    np.testing.assert_array_equal(gathered, _numpy_patches(x, kernel_size, strides))


# (batch, height, width, channels, out_channels, kernel_size, strides, padding); batches of
# 1 and 6 leave some of the batch pieces empty or one image shorter.
_CASES = [
    (6, 20, 20, 16, 24, 9, 2, "VALID"),
    (1, 20, 20, 8, 8, 9, 2, "VALID"),
    (5, 8, 8, 4, 6, 5, 2, "SAME"),
    (3, 7, 10, 3, 5, 3, 1, "SAME"),
    (4, 9, 9, 2, 3, 3, 2, "same"),
    (2, 6, 6, 3, 4, 1, 1, "VALID"),
    # Strides above the kernel leave input rows and columns that no tap reads.
    (3, 9, 7, 4, 5, 1, 2, "VALID"),
    (2, 11, 8, 3, 2, 2, 3, "VALID"),
    (2, 11, 9, 5, 3, 4, 2, "VALID"),
]


@pytest.mark.parametrize("batch,height,width,channels,out_channels,kernel_size,strides,padding",
                         _CASES)
def test_patch_conv2d_values_and_gradients_equal_conv2d(
    batch, height, width, channels, out_channels, kernel_size, strides, padding
):
    x = tf.constant(_random((batch, height, width, channels), 1))
    kernel = tf.Variable(_random((kernel_size, kernel_size, channels, out_channels), 2))
    results = []
    for fn, fn_padding in ((conv.patch_conv2d, padding), (tf.nn.conv2d, padding.upper())):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x, kernel, strides, fn_padding)
            # A weighted sum, so every output position has its own upstream gradient.
            loss = tf.reduce_sum(y * tf.constant(_random(y.shape, 3)))
        results.append([y, *tape.gradient(loss, [x, kernel])])
    for ours, plain in zip(*results, strict=True):
        assert ours.shape == plain.shape
        np.testing.assert_allclose(ours.numpy(), plain.numpy(), rtol=1e-5, atol=1e-4)


def _values_and_gradients(fn, x, kernel):
    """fn(x, kernel, 2, "VALID") and the gradients of its weighted sum to x and kernel."""
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = fn(x, kernel, 2, "VALID")
        loss = tf.reduce_sum(y * tf.reshape(tf.range(tf.size(y), dtype=y.dtype), tf.shape(y)))
    return [y, *tape.gradient(loss, [x, kernel])]


@pytest.mark.slow
def test_patch_conv2d_with_unknown_batch_in_tf_function_and_xla():
    kernel = tf.constant(_random((5, 5, 4, 6), 4))
    spec = tf.TensorSpec([None, 12, 12, 4], tf.float32)
    run = lambda x: _values_and_gradients(conv.patch_conv2d, x, kernel)  # noqa: E731
    traced = tf.function(run, input_signature=[spec])
    compiled = tf.function(run, jit_compile=True)
    for batch in (1, 7):
        x = tf.constant(_random((batch, 12, 12, 4), batch))
        expected = _values_and_gradients(tf.nn.conv2d, x, kernel)
        for got in (traced(x), compiled(x)):
            for ours, plain in zip(got, expected, strict=True):
                np.testing.assert_allclose(ours.numpy(), plain.numpy(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("batch,height,width,channels,out_channels,kernel_size,strides,padding",
                         [case for case in _CASES if case[-1] == "VALID"])
def test_per_tap_input_gradient_equals_conv2d_transpose(
    batch, height, width, channels, out_channels, kernel_size, strides, padding
):
    """The 16-bit types' input gradient, checked in float32 on every "VALID" case."""
    kernel = tf.constant(_random((kernel_size, kernel_size, channels, out_channels), 13))
    out_height, out_width = (conv.conv_output_length(length, kernel_size, strides, padding)
                             for length in (height, width))
    d_outputs = tf.constant(_random((batch, out_height, out_width, out_channels), 14))
    # conv2d_transpose is TensorFlow's gradient of conv2d to its input.
    expected = tf.nn.conv2d_transpose(d_outputs, kernel, [batch, height, width, channels],
                                      strides, padding)
    got = conv._per_tap_input_gradient(d_outputs, kernel, strides, height, width)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_patch_conv2d_unknown_spatial_size_is_conv2d():
    kernel = tf.constant(_random((3, 3, 2, 5), 5))
    spec = tf.TensorSpec([None, None, None, 2], tf.float32)
    traced = tf.function(lambda x: conv.patch_conv2d(x, kernel, 1, "SAME"), input_signature=[spec])
    x = _random((2, 6, 5, 2), 6)
    np.testing.assert_allclose(traced(x).numpy(), tf.nn.conv2d(x, kernel, 1, "SAME").numpy(),
                               rtol=1e-5, atol=1e-5)


def test_patch_conv2d_float64_gradients_keep_float64_precision():
    x = tf.constant(_random((2, 11, 9, 3), 10), tf.float64)
    kernel = tf.constant(_random((3, 3, 3, 4), 11), tf.float64)
    upstream = tf.constant(_random((2, 5, 4, 4), 12), tf.float64)
    gradients = []
    for fn in (conv.patch_conv2d, tf.nn.conv2d):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            loss = tf.reduce_sum(fn(x, kernel, 2, "VALID") * upstream)
        gradients.append(tape.gradient(loss, [x, kernel]))
    for ours, plain in zip(*gradients, strict=True):
        assert ours.dtype == tf.float64
        np.testing.assert_allclose(ours.numpy(), plain.numpy(), rtol=1e-12, atol=1e-12)


def test_patch_conv2d_bfloat16():
    x = _random((3, 10, 10, 8), 7)
    kernel = _random((3, 3, 8, 4), 8)
    upstream = _random((3, 4, 4, 4), 9)
    results = []
    for dtype, fn in ((tf.bfloat16, conv.patch_conv2d), (tf.float32, tf.nn.conv2d)):
        inputs = tf.cast(x, dtype)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = fn(inputs, tf.cast(kernel, dtype), 2, "VALID")
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        results.append([y, tape.gradient(loss, inputs)])
    assert [t.dtype for t in results[0]] == [tf.bfloat16, tf.bfloat16]
    for got, expected in zip(*results, strict=True):
        np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), expected.numpy(),
                                   rtol=0.05, atol=0.2)


@pytest.mark.parametrize("kernel_shape,padding,message", [
    ((3, 3, 5, 4), "VALID", "square kernel"),
    ((3, 2, 4, 4), "VALID", "square kernel"),
    ((3, 3, 4, 4), "FULL", "padding must be 'VALID' or 'SAME'"),
    ((9, 9, 4, 4), "VALID", "does not fit"),
])
def test_patch_conv2d_rejects_bad_arguments(kernel_shape, padding, message):
    with pytest.raises(ValueError, match=message):
        conv.patch_conv2d(tf.zeros([1, 6, 6, 4]), tf.zeros(kernel_shape), 1, padding)
