"""Restoring the reference's TF1 checkpoints into CapsNet and ConvBaseline.

The reference (Sarasra/models, research/capsules) saved its models with a
tf.compat.v1 Saver, which names each variable by its variable scope, for example
`conv_capsule1/weights`. Its released checkpoints (MNIST `model.ckpt-1`, the seven
CIFAR10 models `cifar{0..6}/model.ckpt-600000`) are restored here so that the Keras
models compute the reference's logits. Names and shapes, TF1 -> Keras:

  CapsNet (the reference's CapsuleModel)
    conv1/weights          [9, 9, depth, 256]          conv1.kernel (same)
    conv1/biases           [256]                       conv1.bias (same)
    conv_capsule1/weights  [9, 9, 256, P * 8]          primary_capsules.kernel (same)
    conv_capsule1/biases   [P, 8, 1, 1]                primary_capsules.bias [P, 8]
    capsule2/weights       [P * h * w, 8, classes * 16]  class_capsules.kernel (same)
    capsule2/biases        [classes, 16]               class_capsules.bias (same)
    recons/recons_i/weights, recons/recons_i/biases, i = 1, 2, 3
                           [in, out], [out]            decoder.dense_layers[i - 1] (same)
  ConvBaseline (the reference's ConvModel)
    conv1/weights [5, 5, depth, 512], conv2/weights [5, 5, 512, 256] and their biases
                                                       convs[0], convs[1] (same)
    fc1/weights [256 * h * w, 1024], softmax_layer/weights [1024, classes] and biases
                                                       fc1, softmax_layer (same)

where P = num_prime_capsules and h, w are the primary capsules' (baseline: the
second pooling's) output rows and columns.

Why the arrays copy unchanged although the reference computes in NCHW:
- TF1 stores conv2d filters HWIO in either data format, as Keras does.
- The reference splits the primary-capsule conv's output channel as
  (capsule type, atom), channel = type * 8 + atom; `PrimaryCapsule` does the same.
- The reference flattens the primary capsules in (type, row, column) order before
  capsule2, and the baseline's last pooling output in (channel, row, column)
  order before fc1; the Keras models flatten in these orders too, so the rows of
  capsule2/weights and fc1/weights line up.
- The decoder's input is the masked class capsules flattened capsule-major, and its
  output pixels are depth-major (CHW), as in the reference.
Only the primary capsules' bias loses its two trailing broadcast axes.

Accepted besides the model's variables, and ignored: `global_step`, Adam's slots
(`.../Adam`, `.../Adam_1`) and `beta1_power`, `beta2_power`. A name's last part may
carry a `_N` suffix that TF1 added to make it unique (`conv1/weights_1`).
"""

from __future__ import annotations

import dataclasses
import re

import keras
import numpy as np
import tensorflow as tf

from capsules.errors import UsageError
from capsules.hparams import HParams
from capsules.models import CapsNet, ConvBaseline

# Variables of the reference's training that the models do not have.
_IGNORED = re.compile(r"^(global_step|beta[12]_power(_\d+)?)$|/Adam(_\d+)?$")
# A model variable: a scope path, then weights or biases, maybe uniquified (`weights_1`).
_MODEL_VARIABLE = re.compile(r"^(?P<name>.+/(weights|biases))(_\d+)?$")

_CAPSNET_SCOPES = ("conv1", "conv_capsule1", "capsule2") + tuple(
    f"recons/recons_{i}" for i in (1, 2, 3)
)
_BASELINE_SCOPES = ("conv1", "conv2", "fc1", "softmax_layer")
_CAPSNET_ONLY = ("conv_capsule1/", "capsule2/", "recons/")
_BASELINE_ONLY = ("conv2/", "fc1/", "softmax_layer/")


@dataclasses.dataclass(frozen=True)
class _Target:
    """A model variable and the name and shape of its value in a reference checkpoint."""

    name: str
    variable: keras.Variable
    tf1_shape: tuple[int, ...]


def restore(model: keras.Model, checkpoint_prefix: str) -> None:
    """Assigns the variables of a reference TF1 checkpoint to a built CapsNet or ConvBaseline.

    Args:
      model: a `capsules.models.CapsNet` or `ConvBaseline` whose hyper-parameters,
        input shape and classes are those the checkpoint was trained with (for the
        reference's CIFAR10 models: input 24x24x3 and num_prime_capsules=64,
        padding=SAME, leaky=true, remake=false).
      checkpoint_prefix: the checkpoint's path without `.index` / `.data-*`, e.g.
        `mnist_checkpoint/model.ckpt-1`.

    Raises:
      TypeError: for another kind of model.
      capsules.errors.UsageError (a ValueError): the checkpoint has variables the
        model does not know (listed), or lacks some of the model's, or a shape differs;
        the message names each variable with the shape expected and found and, where one
        exists, the --hparams_override that would fit. Nothing is assigned then.
    """
    kind = _kind(model)
    shapes = {
        name: tuple(shape)
        for name, shape in tf.train.list_variables(checkpoint_prefix)
        if not _IGNORED.search(name)
    }
    found = _match_names(shapes, kind, checkpoint_prefix)  # reference name -> stored name
    targets = {target.name: target for target in _targets(model)}
    problems = []
    for name, target in targets.items():
        if name not in found:
            problems.append(f"  {name}: missing from the checkpoint")
        elif shapes[found[name]] != target.tf1_shape:
            problems.append(
                f"  {found[name]}: this model expects shape {list(target.tf1_shape)}, "
                f"the checkpoint has {list(shapes[found[name]])}"
            )
    for name in sorted(set(found) - set(targets)):
        problems.append(f"  {found[name]}: in the checkpoint, not in this model")
    if problems:
        raise UsageError(
            f"checkpoint {checkpoint_prefix} does not fit this {_describe(model)}:\n"
            + "\n".join(problems)
            + "\n"
            + _fitting_override_hint(model, {name: shapes[found[name]] for name in found})
        )
    reader = tf.train.load_checkpoint(checkpoint_prefix)
    for name, target in targets.items():
        value = np.asarray(reader.get_tensor(found[name]))
        target.variable.assign(value.reshape(target.variable.shape).astype(target.variable.dtype))


def _kind(model: keras.Model) -> str:
    if isinstance(model, CapsNet):
        return "capsule"
    if isinstance(model, ConvBaseline):
        return "baseline"
    raise TypeError(
        f"a reference TF1 checkpoint restores into CapsNet or ConvBaseline, "
        f"not {model.__class__.__name__}"
    )


def _match_names(shapes: dict[str, tuple], kind: str, checkpoint_prefix: str) -> dict[str, str]:
    """Reference name (`conv1/weights`) -> name stored in the checkpoint (`conv1/weights_1`).

    Raises ValueError listing the variables that are no variable of the model kind's
    reference, or naming two stored variables that would both be the same one.
    """
    scopes = _CAPSNET_SCOPES if kind == "capsule" else _BASELINE_SCOPES
    known = {f"{scope}/{part}" for scope in scopes for part in ("weights", "biases")}
    found, unknown = {}, []
    for stored in sorted(shapes):
        match = _MODEL_VARIABLE.match(stored)
        name = match.group("name") if match else None
        if name not in known:
            unknown.append(stored)
        elif name in found:
            raise UsageError(
                f"checkpoint {checkpoint_prefix} holds both {found[name]} and {stored}; "
                f"expected one variable {name}"
            )
        else:
            found[name] = stored
    if unknown:
        other = _CAPSNET_ONLY if kind == "baseline" else _BASELINE_ONLY
        hint = ""
        if any(name.startswith(other) for name in unknown):
            hint = " (it looks like a checkpoint of the other model: try --model=" + (
                "capsule)" if kind == "baseline" else "baseline)"
            )
        model_name = "CapsNet" if kind == "capsule" else "ConvBaseline"
        raise UsageError(
            f"checkpoint {checkpoint_prefix} has variables that a reference {model_name} does "
            f"not have: {', '.join(unknown)}{hint}"
        )
    return found


def _targets(model: keras.Model) -> list[_Target]:
    """The model's variables under their reference names, with the reference's shapes."""
    if isinstance(model, CapsNet):
        layers = [
            ("conv1", model.conv1),
            ("conv_capsule1", model.primary_capsules),
            ("capsule2", model.class_capsules),
        ]
        if model.decoder is not None:
            dense_layers = model.decoder.dense_layers
            layers += [(f"recons/recons_{i + 1}", dense) for i, dense in enumerate(dense_layers)]
    else:
        layers = [
            ("conv1", model.convs[0]),
            ("conv2", model.convs[1]),
            ("fc1", model.fc1),
            ("softmax_layer", model.softmax_layer),
        ]
    targets = []
    for scope, layer in layers:
        targets.append(_Target(f"{scope}/weights", layer.kernel, tuple(layer.kernel.shape)))
        bias_shape = tuple(layer.bias.shape)
        if scope == "conv_capsule1":
            # The reference's bias [P, 8, 1, 1] broadcasts over the NCHW grid of the
            # primary capsules; PrimaryCapsule keeps [P, 8].
            bias_shape += (1, 1)
        targets.append(_Target(f"{scope}/biases", layer.bias, bias_shape))
    return targets


def _describe(model: keras.Model) -> str:
    height, width, depth = model.image_shape
    hp = model.hparams
    settings = f"padding={hp.padding}"
    if isinstance(model, CapsNet):
        settings = (
            f"num_prime_capsules={hp.num_prime_capsules}, {settings}, "
            f"leaky={str(hp.leaky).lower()}, remake={str(hp.remake).lower()}"
        )
    return (
        f"{model.__class__.__name__} (images {height}x{width}x{depth}, "
        f"{model.num_classes} classes, {settings})"
    )


# -- Which hyper-parameters would fit ------------------------------------------------


def _conv_length(length: int, kernel_size: int, strides: int, padding: str) -> int:
    if padding == "SAME":
        return -(-length // strides)
    return (length - kernel_size) // strides + 1


def _capsnet_shapes(
    hp: HParams, image_shape: tuple[int, int, int], num_classes: int
) -> dict[str, tuple[int, ...]]:
    """The reference CapsuleModel's variable shapes for hparams, images [h, w, depth], classes."""
    height, width, depth = image_shape
    grid = [
        _conv_length(_conv_length(length, 9, 1, hp.padding), 9, 2, hp.padding)
        for length in (height, width)
    ]
    primary = hp.num_prime_capsules
    shapes = {
        "conv1/weights": (9, 9, depth, 256),
        "conv1/biases": (256,),
        "conv_capsule1/weights": (9, 9, 256, primary * 8),
        "conv_capsule1/biases": (primary, 8, 1, 1),
        "capsule2/weights": (primary * grid[0] * grid[1], 8, num_classes * 16),
        "capsule2/biases": (num_classes, 16),
    }
    if hp.remake:
        sizes = (num_classes * 16, 512, 1024, height * width * depth)
        for i in range(3):
            shapes[f"recons/recons_{i + 1}/weights"] = (sizes[i], sizes[i + 1])
            shapes[f"recons/recons_{i + 1}/biases"] = (sizes[i + 1],)
    return shapes


def _baseline_shapes(
    hp: HParams, image_shape: tuple[int, int, int], num_classes: int
) -> dict[str, tuple[int, ...]]:
    """The reference ConvModel's variable shapes: two 5x5 convs, each pooled 2x2 (SAME)."""
    height, width, depth = image_shape
    grid = [height, width]
    for _ in range(2):
        grid = [_conv_length(_conv_length(length, 5, 1, hp.padding), 2, 2, "SAME")
                for length in grid]
    return {
        "conv1/weights": (5, 5, depth, 512),
        "conv1/biases": (512,),
        "conv2/weights": (5, 5, 512, 256),
        "conv2/biases": (256,),
        "fc1/weights": (256 * grid[0] * grid[1], 1024),
        "fc1/biases": (1024,),
        "softmax_layer/weights": (1024, num_classes),
        "softmax_layer/biases": (num_classes,),
    }


def _fitting_override_hint(model: keras.Model, found: dict[str, tuple[int, ...]]) -> str:
    """The --hparams_override under which the model's variables take the checkpoint's shapes.

    `found` maps reference names to the checkpoint's shapes. The prime capsule count
    is read off conv_capsule1/weights and the decoder off the recons variables; the
    padding is searched. Leaky routing has no variable, so it cannot be told.
    """
    hp = model.hparams
    capsnet = isinstance(model, CapsNet)
    changes = {}
    if capsnet:
        primary_channels = found.get("conv_capsule1/weights", (0,) * 4)[3]
        if primary_channels > 0 and primary_channels % 8 == 0:
            changes["num_prime_capsules"] = primary_channels // 8
        changes["remake"] = any(name.startswith("recons/") for name in found)
    shapes_of = _capsnet_shapes if capsnet else _baseline_shapes
    for padding in (hp.padding, *(p for p in ("VALID", "SAME") if p != hp.padding)):
        candidate = hp.replace(**changes, padding=padding)
        if shapes_of(candidate, model.image_shape, model.num_classes) != found:
            continue
        overrides = [
            f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key in ("num_prime_capsules", "padding", "remake")
            if getattr(candidate, key) != getattr(hp, key)
            for value in [getattr(candidate, key)]
        ]
        if not overrides:
            break
        hint = f"It fits with --hparams_override={','.join(overrides)}"
        if capsnet:
            hint += (
                " (with your other overrides; leaky routing leaves no variable, so add "
                "leaky=true for a model trained with it, as the reference's CIFAR10 "
                "models were)"
            )
        return hint + "."
    return (
        "No --hparams_override makes it fit: the checkpoint was trained on other images "
        "or classes (check --dataset, --distort, --num_targets and --model)."
    )
