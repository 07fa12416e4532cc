"""2-D convolution as matrix products over gathered patches (the capsule layers' convolution).

`patch_conv2d` computes what `tf.nn.conv2d` computes (NHWC, square kernel and
strides, "VALID" or "SAME"): every output position's receptive field is
gathered into a row of a patch matrix, which is multiplied by the kernel, a
few pieces of the batch at a time. Its gradient keeps the patches: the
kernel's gradient is patches^T x d_output, one more matrix product, instead of
a backward-filter convolution. The input's gradient, in float32 and wider, is the
patches' gradient d_output x W^T, one product per piece, added back into the
input positions each patch row was gathered from (`_scattered_input_gradient`);
in bfloat16 and float16 it is one product per kernel tap, d_output x W[ky, kx]^T,
summed in float32 where the tap reads (`_per_tap_input_gradient`), which keeps
the sums in float32 without first widening the whole patch gradient.

Why: on CPU the matrix products run at the machine's matmul speed, faster than
oneDNN's backward-filter convolution and than TensorFlow's backward-input
convolution, which forms the whole batch's patch gradient in one product (382 MB
for the primary capsules at batch 128) before summing it; a piece's is a quarter
of that, summed while still warm (timings: benchmarks/README.md, `python
benchmarks/capsule_ops.py`). The cost is memory while training: the patches,
kernel_size^2 / strides^2 times the input (7.3x for the primary capsules), live
from the forward to the backward pass.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# The batch is cut into this many pieces, each gathered and multiplied on its own:
# a piece's gather overlaps another's matmul, and its patches are written and read
# back while still warm (4 against 1: benchmarks/README.md).
_PIECES = 4


def conv_output_length(length: int | None, kernel_size: int, strides: int, padding: str):
    """Output length of one spatial axis of a "VALID" or "SAME" convolution (None stays None)."""
    if length is None:
        return None
    if padding == "SAME":
        return -(-length // strides)
    return (length - kernel_size) // strides + 1


def _same_padding(length: int, kernel_size: int, strides: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding (before, after) of one spatial axis."""
    out = conv_output_length(length, kernel_size, strides, "SAME")
    total = max((out - 1) * strides + kernel_size - length, 0)
    return total // 2, total - total // 2


def patch_indices(height: int, width: int, kernel_size: int, strides: int) -> np.ndarray:
    """Flat input positions `[out_height * out_width * kernel_size**2]` of all "VALID" patches.

    Ordered (out_row, out_col, kernel_row, kernel_col), so that the gathered
    patch of one output position is laid out like a `[kh, kw, channels]` slice
    of an HWIO kernel.
    """
    out_height, out_width = (
        conv_output_length(length, kernel_size, strides, "VALID") for length in (height, width)
    )
    if out_height < 1 or out_width < 1:
        raise ValueError(
            f"kernel_size={kernel_size} does not fit the {height}x{width} input with "
            "padding='VALID'"
        )
    rows = strides * np.arange(out_height)[:, None] + np.arange(kernel_size)  # [oh, kh]
    cols = strides * np.arange(out_width)[:, None] + np.arange(kernel_size)  # [ow, kw]
    flat = rows[:, None, :, None] * width + cols[None, :, None, :]  # [oh, ow, kh, kw]
    return flat.reshape(-1).astype(np.int32)


def patch_conv2d(inputs: tf.Tensor, kernel: tf.Tensor, strides: int, padding: str) -> tf.Tensor:
    """`tf.nn.conv2d(inputs, kernel, strides, padding)` as patches x kernel.

    inputs `[batch, height, width, in_channels]`, kernel `[k, k, in_channels,
    out_channels]`, returns `[batch, out_height, out_width, out_channels]`
    (with height or width unknown, this is `tf.nn.conv2d`). Gradients: the kernel's is
    patches^T x d_output; the input's is `_scattered_input_gradient` in float32 and wider,
    `_per_tap_input_gradient` in 16-bit types (the faster of the two for each:
    benchmarks/README.md).
    """
    kernel_size, kernel_width, in_channels, out_channels = kernel.shape
    _, height, width, channels = inputs.shape
    if height is None or width is None:
        # The patch indices need the spatial size; without it, the plain convolution.
        return tf.nn.conv2d(inputs, kernel, strides, padding)
    if kernel_size != kernel_width or channels != in_channels:
        raise ValueError(
            f"patch_conv2d expects a square kernel [k, k, {channels}, out] for inputs of shape "
            f"{tuple(inputs.shape)}, got kernel shape {tuple(kernel.shape)}"
        )
    padding = padding.upper()
    if padding == "SAME":
        pad_rows = _same_padding(height, kernel_size, strides)
        pad_cols = _same_padding(width, kernel_size, strides)
        inputs = tf.pad(inputs, [[0, 0], pad_rows, pad_cols, [0, 0]])
        height, width = height + sum(pad_rows), width + sum(pad_cols)
    elif padding != "VALID":
        raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
    indices = tf.constant(patch_indices(height, width, kernel_size, strides))
    out_height, out_width = (
        conv_output_length(length, kernel_size, strides, "VALID") for length in (height, width)
    )
    patch_size = kernel_size * kernel_size * channels
    positions = out_height * out_width

    @tf.custom_gradient
    def conv(x, w):
        batch = tf.shape(x)[0]
        # Pieces of the batch, in order; the last ones may be one image shorter (or empty).
        sizes = batch // _PIECES + tf.cast(tf.range(_PIECES) < batch % _PIECES, tf.int32)
        patches = [
            tf.reshape(
                tf.gather(tf.reshape(piece, [-1, height * width, channels]), indices, axis=1),
                [-1, patch_size],
            )
            for piece in tf.split(x, sizes, num=_PIECES)
        ]
        flat_kernel = tf.reshape(w, [patch_size, out_channels])
        outputs = tf.concat([tf.matmul(piece, flat_kernel) for piece in patches], axis=0)
        outputs = tf.reshape(outputs, [batch, out_height, out_width, out_channels])

        def grad(d_outputs):
            d_flat = tf.split(tf.reshape(d_outputs, [-1, out_channels]), sizes * positions,
                              num=_PIECES)
            d_kernel = tf.add_n([
                tf.matmul(piece, d_piece, transpose_a=True)
                for piece, d_piece in zip(patches, d_flat, strict=True)
            ])
            if d_outputs.dtype.size < 4:
                d_x = _per_tap_input_gradient(d_outputs, w, strides, height, width)
            else:
                d_x = _scattered_input_gradient(d_flat, flat_kernel, indices, sizes,
                                                [height, width, channels])
            return d_x, tf.reshape(d_kernel, tf.shape(w))

        return outputs, grad

    # A variable read inside a custom gradient would need its own gradient path: read it here.
    return conv(inputs, tf.convert_to_tensor(kernel))


def _scattered_input_gradient(d_pieces: list[tf.Tensor], flat_kernel: tf.Tensor,
                              indices: tf.Tensor, sizes: tf.Tensor,
                              image_shape: list[int]) -> tf.Tensor:
    """Gradient `[batch, height, width, channels]` of the input of `patch_conv2d`'s gather.

    Each piece's patch gradient, d_outputs `[images * positions, out]` x flat_kernel^T
    `[out, k * k * channels]`, has one row of `channels` per (image, output position,
    tap); the row is added into the input position it was gathered from (`indices`,
    offset by the image), the transpose of the forward gather.
    """
    height, width, channels = image_shape
    pixels = height * width
    gradients = []
    for size, d_piece in zip(tf.unstack(sizes, num=_PIECES), d_pieces, strict=True):
        d_patches = tf.reshape(tf.matmul(d_piece, flat_kernel, transpose_b=True), [-1, channels])
        targets = tf.reshape(tf.range(size)[:, None] * pixels + indices[None, :], [-1])
        gradients.append(tf.math.unsorted_segment_sum(d_patches, targets, size * pixels))
    return tf.reshape(tf.concat(gradients, axis=0), [-1, height, width, channels])


def _per_tap_input_gradient(d_outputs: tf.Tensor, kernel: tf.Tensor, strides: int, height: int,
                            width: int) -> tf.Tensor:
    """Gradient `[batch, height, width, in_channels]` of a "VALID" convolution's input.

    Input position (oy s + ky, ox s + kx) receives d_outputs[oy, ox] x W[ky, kx]^T from
    tap (ky, kx). The taps of one phase (ky mod s, kx mod s) all land on the same
    sub-grid of every s-th row and column, each shifted by (ky // s, kx // s): they are
    summed there (in float32 at least), and the s x s sub-grids interleaved.
    """
    kernel_size, _, in_channels, out_channels = kernel.shape
    batch = tf.shape(d_outputs)[0]
    _, out_height, out_width, _ = d_outputs.shape
    grid_height, grid_width = -(-height // strides), -(-width // strides)
    flat = tf.reshape(d_outputs, [-1, out_channels])
    # bfloat16 or float16 products are summed in float32, as a convolution accumulates.
    sum_dtype = tf.float32 if d_outputs.dtype.size < 4 else d_outputs.dtype

    def tap(ky, kx):
        product = tf.matmul(flat, kernel[ky, kx], transpose_b=True)
        return tf.cast(tf.reshape(product, [batch, out_height, out_width, in_channels]),
                       sum_dtype)

    def shifted(value, axis, shift, size, length):
        paddings = [[0, 0]] * 4
        paddings[axis] = [shift, size - length - shift]
        return tf.pad(value, paddings)

    def phase(phase_y, phase_x):
        rows = []
        for ky in range(phase_y, kernel_size, strides):
            # The taps of one kernel row are summed at the output's height first.
            taps = [shifted(tap(ky, kx), 2, kx // strides, grid_width, out_width)
                    for kx in range(phase_x, kernel_size, strides)]
            if taps:
                rows.append(shifted(tf.add_n(taps), 1, ky // strides, grid_height, out_height))
        if not rows:
            return tf.zeros([batch, grid_height, grid_width, in_channels], sum_dtype)
        return tf.add_n(rows)

    phases = [tf.stack([phase(phase_y, phase_x) for phase_x in range(strides)], axis=3)
              for phase_y in range(strides)]
    interleaved = tf.reshape(
        tf.stack(phases, axis=2), [batch, grid_height * strides, grid_width * strides, in_channels]
    )
    return tf.cast(interleaved[:, :height, :width], d_outputs.dtype)
