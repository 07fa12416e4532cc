"""The model of a checkpoint: the run file beside it, `load_model`, `restore_weights`.

Training writes the run file (RUN_FILE) next to its checkpoints: the model's name in
`capsules.models.MODELS`, its constructor config (input shape, classes, targets), the
hyper-parameters and the run's flags. From it `load_model` rebuilds the model of a
checkpoint and restores its weights, from the checkpoint's path alone; the reference's TF1
checkpoints (no run file) need the model and the data set's shape as arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import keras
import tensorflow as tf

from capsules import models
from capsules.errors import MissingFileError, UsageError
from capsules.hparams import HParams, ValidatedHParams, parse_overrides

RUN_FILE = "hparams.json"
"""The run file's name (hparams.json: older run files held the hparams and flags only)."""
_INDEX = re.compile(r"(.+-(\d+))\.index$")
_SHARD = re.compile(r"\.data-(\d{5})-of-(\d{5})$")
# What reading a damaged checkpoint raises: TensorFlow's errors (bad magic number, CRC
# mismatch), IndexError for a truncated data file, OSError for an unreadable one.
READ_ERRORS = (tf.errors.OpError, IndexError, OSError)


@dataclasses.dataclass(frozen=True)
class RunFile:
    """What training wrote next to its checkpoints.

    Attributes:
      model: the model's name in `capsules.models.MODELS` ('capsule', 'baseline', ...).
      config: the model's `get_config()` without the hparams (input_shape, num_classes,
        num_targets, name); None in an older run file.
      hparams: the run's hyper-parameters (of the model's `hparams_class`).
      flags: the run's flags (dataset, batch_size, seed, ...).
    """

    model: str | None
    config: dict[str, Any] | None
    hparams: ValidatedHParams
    flags: dict[str, Any]


def write_json_atomically(path: str, content: dict) -> None:
    """Writes `content` to `path` through a temporary file and a rename."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def model_name(model: keras.Model) -> str:
    """The name of `model`'s class in `capsules.models.MODELS`; ValueError if it has none."""
    for name, cls in models.MODELS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not in capsules.models.MODELS "
                     f"({', '.join(models.MODELS)}): register it there to write its run file")


def run_file_content(model: keras.Model, flags: dict[str, Any] | None = None) -> dict:
    """The run file of checkpoints of `model`: its name, config, hparams and the `flags`."""
    name = model_name(model)
    config = model.get_config()
    hparams = config.pop("hparams")
    return {"model": name, "config": config, "hparams": hparams, "flags": dict(flags or {})}


def write_run_file(directory: str, model: keras.Model, flags: dict[str, Any] | None = None
                   ) -> str:
    """Writes directory/RUN_FILE for checkpoints of `model` (atomically); returns its path."""
    path = os.path.join(directory, RUN_FILE)
    write_json_atomically(path, run_file_content(model, flags))
    return path


def read_run_file(checkpoint_path: str) -> RunFile | None:
    """The run file next to `checkpoint_path`, or None where there is none (TF1 checkpoints).

    Older run files ({"hparams": ..., FLAG: value, ...}) give config None and their flags.
    """
    path = os.path.join(os.path.dirname(checkpoint_path), RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (OSError, ValueError) as error:  # unreadable, or not JSON (damaged)
        raise UsageError(f"{path} cannot be read ({error})") from None
    # Older run files (no "model") are CapsNet's or ConvBaseline's: HParams.
    known = models.MODELS.get(content.get("model"))
    try:
        hparams = (known.hparams_class if known else HParams).from_dict(content["hparams"])
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{path}: no valid hparams ({error})") from None
    if "config" in content:
        return RunFile(content.get("model"), content["config"], hparams, content.get("flags", {}))
    flags = {key: value for key, value in content.items() if key != "hparams"}
    return RunFile(flags.get("model"), None, hparams, flags)


def load_model(checkpoint_path: str, hparams_override: str | None = None, *,
               model: str | None = None, dataset_info: Any = None,
               dtype: str | None = None) -> keras.Model:
    """The model of `checkpoint_path`, built, with the checkpoint's weights restored: their
    moving average where the model keeps one (EMHParams.ema_momentum) and the checkpoint is
    a training one (with the optimizer's state; an export holds the average already).

    The model's class, constructor config and hyper-parameters come from the run file next
    to the checkpoint, the hyper-parameters then changed by `hparams_override`
    ("key=value,...", the reference's --hparams_override): the path alone suffices for any
    checkpoint this package wrote. `model` and `dataset_info` are used only where the run
    file lacks them: a reference TF1 checkpoint (no run file; the reference's default
    hparams) needs both, an older run file (hparams and flags only) `dataset_info`.

    Args:
      checkpoint_path: a checkpoint prefix, e.g. `runs/mnist/train/model.ckpt-3000`, its
        `.index` file, or a folder (its latest checkpoint; `resolve_checkpoint`).
      hparams_override: "key=value,..." applied to the hyper-parameters.
      model: a name in `capsules.models.MODELS` ('capsule', 'baseline', ...).
      dataset_info: the images' shape and targets: anything with height, width, depth,
        num_classes and num_targets, e.g. `capsules.datasets.dataset_info("mnist")`.
      dtype: the dtype policy to build the model in ("float32", "mixed_bfloat16"); None:
        the run file's, the policy it was trained in. Weights are float32 under either,
        so any checkpoint loads in any policy.

    Raises:
      MissingFileError: no checkpoint at `checkpoint_path`.
      UsageError: a bad override, an argument the checkpoint needs and was not given (named),
        a checkpoint that does not fit its model, or a damaged checkpoint or run file.

    Example:
      >>> model = load_model("checkpoints/mnist/model.ckpt-20000")
      >>> lengths = model(images)  # [batch, 10]
    """
    checkpoint_path = resolve_checkpoint(checkpoint_path)
    run = read_run_file(checkpoint_path)
    name = run.model if run and run.model else model
    config = run.config if run else None
    if config is None and dataset_info is not None:
        config = {"input_shape": [dataset_info.height, dataset_info.width, dataset_info.depth],
                  "num_classes": dataset_info.num_classes,
                  "num_targets": dataset_info.num_targets}
    missing = [what for what, value in (("model", name), ("dataset_info", config))
               if value is None]
    if missing:
        why = (f"its run file {RUN_FILE} predates the model config" if run else
               f"it has no run file {RUN_FILE} (a reference TF1 checkpoint?)")
        raise UsageError(f"checkpoint {checkpoint_path}: {why}; give the "
                         f"{' and the '.join(missing)} (e.g. model='capsule', "
                         "dataset_info=input_data.dataset_info('mnist'))")
    if name not in models.MODELS:
        raise UsageError(f"checkpoint {checkpoint_path}: unknown model {name!r}; expected one "
                         f"of: {', '.join(models.MODELS)}")
    try:
        hparams = parse_overrides(run.hparams if run else models.MODELS[name].hparams_class(),
                                  hparams_override)
    except ValueError as error:
        raise UsageError(f"hparams_override: {error}") from None
    if dtype is not None:
        config = {**config, "dtype": dtype}
    built = models.MODELS[name].from_config({**config, "hparams": hparams.to_dict()})
    try:
        if getattr(hparams, "ema_momentum", 0) and has_optimizer_state(checkpoint_path):
            _restore_moving_average(built, checkpoint_path)
        else:
            _restore_weights(built, checkpoint_path)
    except READ_ERRORS as error:
        raise _read_error(checkpoint_path, error) from None
    return built


def _restore_moving_average(model: keras.Model, path: str) -> None:
    """Puts the moving average of the weights that training checkpoint `path` holds (in its
    optimizer, Keras' `use_ema`) into `model`'s weights."""
    twin = model.__class__.from_config(model.get_config())
    twin.compile()  # the averages are optimizer variables: restored into a compiled twin
    try:
        _restore_checked(twin, path)
    except UsageError as error:
        raise UsageError(f"{error}; a checkpoint trained without the weights' moving average "
                         "loads with hparams_override='ema_momentum=0'") from None
    twin.optimizer.finalize_variable_values(twin.trainable_variables)
    model.set_weights(twin.get_weights())


def require_checkpoint(path: str) -> None:
    """Raises MissingFileError naming `path` unless it is a checkpoint prefix."""
    if not tf.io.gfile.exists(path + ".index"):
        raise MissingFileError(f"checkpoint {path} not found (no file {path}.index)")


def complete_checkpoints(directory: str) -> list[str]:
    """Prefixes `PREFIX-STEP` in `directory` whose index and every data shard exist.

    Sorted by step, oldest first. (Whether they read back is found when restoring.)
    """
    names = os.listdir(directory) if os.path.isdir(directory) else []
    found = []
    for name in names:
        match = _INDEX.match(name)
        if not match:
            continue
        prefix = match.group(1)
        shards = [shard for other in names if other.startswith(prefix + ".data-")
                  and (shard := _SHARD.search(other))]
        counts = {int(shard.group(2)) for shard in shards}
        if len(counts) == 1 and len(shards) == counts.pop():
            found.append((int(match.group(2)), os.path.join(directory, prefix)))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(path: str) -> str:
    """The checkpoint prefix meant by `path`: a prefix, its `.index` or `.data-*` file, or a
    folder (its latest checkpoint: the one its `checkpoint` state file names if complete,
    else the newest complete one).

    Raises:
      MissingFileError: naming `path` when it leads to no checkpoint.
    """
    if os.path.isdir(path):
        try:
            latest = tf.train.latest_checkpoint(path)
        except (ValueError, tf.errors.OpError):  # a garbled state file
            latest = None
        complete = complete_checkpoints(path)
        if latest is not None and os.path.abspath(latest) in map(os.path.abspath, complete):
            return latest
        if complete:
            return complete[-1]
        raise MissingFileError(f"checkpoint folder {path} holds no complete checkpoint "
                                "(PREFIX-STEP.index with its .data-* files)")
    if path.endswith(".index"):
        path = path[: -len(".index")]
    elif shard := _SHARD.search(path):
        path = path[: shard.start()]
    require_checkpoint(path)
    return path


def _read_error(path: str, error: BaseException) -> UsageError:
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()),
                  type(error).__name__)
    return UsageError(f"checkpoint {path} cannot be read ({reason}): it is damaged; use "
                      "another checkpoint")


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint prefix `.../model.ckpt-STEP` (0 without a numeric suffix)."""
    suffix = os.path.basename(path).rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def is_tf1_checkpoint(path: str) -> bool:
    """True for a checkpoint written by the reference's tf.compat.v1 Saver (names by scope)."""
    names = [name for name, _ in tf.train.list_variables(path)]
    return not any(name == "_CHECKPOINTABLE_OBJECT_GRAPH" for name in names)


def has_optimizer_state(path: str) -> bool:
    """True for a checkpoint of this package that holds the optimizer's variables."""
    return any(name.startswith("model/optimizer/") for name, _ in tf.train.list_variables(path))


def restore_weights(model: keras.Model, path: str) -> None:
    """Assigns the weights of checkpoint `path` to the built `model`.

    Accepts this package's checkpoints (tf.train.Checkpoint of the model, with
    or without optimizer state) and the reference's TF1 checkpoints, recognised
    by their variable names (`capsules.tf1_checkpoint`). A compiled model takes
    the optimizer state too where the checkpoint has it; from a weights-only
    checkpoint (as the shipped one) it takes the weights, its optimizer untouched.
    """
    require_checkpoint(path)
    try:
        _restore_weights(model, path)
    except READ_ERRORS as error:
        raise _read_error(path, error) from None


def _restore_weights(model: keras.Model, path: str) -> None:
    if is_tf1_checkpoint(path):
        from capsules import tf1_checkpoint

        tf1_checkpoint.restore(model, path)
        return
    if getattr(model, "optimizer", None) is not None and not has_optimizer_state(path):
        # The compiled model's optimizer variables would be unmatched: restore into an
        # uncompiled twin, checked the same way, and copy its weights.
        twin = model.__class__.from_config(model.get_config())
        _restore_checked(twin, path)
        model.set_weights(twin.get_weights())
        return
    _restore_checked(model, path)


def _restore_checked(model: keras.Model, path: str) -> None:
    """tf.train.Checkpoint restore of `model`; UsageError unless all its objects matched."""
    try:
        status = tf.train.Checkpoint(model=model).restore(path)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:  # unmatched objects; a shape mismatch
        raise UsageError(
            f"checkpoint {path} does not fit this model ({model.__class__.__name__}, "
            f"{model.hparams}): {str(error).splitlines()[0]}"
        ) from None
    status.expect_partial()
