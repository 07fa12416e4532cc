"""Safety of a training directory: one run at a time, leftovers removed, damaged state survived.

A training directory holds the checkpoints `model.ckpt-STEP` with their `checkpoint` state
file, hparams.json (the run file) and the summaries. This module keeps it sound when runs
are killed, files are damaged or two runs are started on it:

- `locked`: a lock file naming the owner (pid, host); a second run stops with an error
  naming it; the lock of a process that is gone (killed, machine rebooted) is taken over.
- `remove_leftovers`: what this package's writers leave when killed mid-write (TensorFlow's
  `model.ckpt-STEP_temp/` folders, `*.tmpNNN` files of atomic writes) is removed at start.
- `repair_state` / `restore_newest`: resume from the newest complete, readable, finite
  checkpoint even when the state file is garbled, empty or names files that are gone.
- `resumed_config`: the run file of a resumed run, its changed settings refused (or, when
  allowed, recorded).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator

import tensorflow as tf

from capsules import models
from capsules.checkpoints import (
    READ_ERRORS,
    RUN_FILE,
    checkpoint_step,
    complete_checkpoints,
)
from capsules.errors import UsageError
from capsules.processes import process_alive

CHECKPOINT_NAME = "model.ckpt"
LOCK_FILE = "run.lock"
STATE_FILE = "checkpoint"
# Kept by default: the newest 5 (tf.train.CheckpointManager's and tf.compat.v1 Saver's own
# default). The reference kept 1000, about 100 GB of Adam-laden MNIST checkpoints.
DEFAULT_KEEP = 5
CHANGES_KEY = "resumed_with_changes"
# The flags of experiment.py that change what a run trains on: a resumed run keeps them (as
# its model, model config and hparams), unless allowed to change them.
SETTINGS_FLAGS = ("dataset", "num_targets", "validate", "random_shift", "distort",
                  "batch_size", "seed", "mixed_bfloat16")
# Temporary names of this package's writers: write_json_atomically and
# input_data.records.atomic_paths (NAME.tmpPID, NAME.tmp-PID), TensorFlow's atomic writes
# of the state file and events (NAME.tmpHEX), its sharded checkpoint saves (PREFIX_temp/).
_TEMP_FILE = re.compile(r".+\.tmp-?[0-9a-f]+$")
_TEMP_DIR = re.compile(re.escape(CHECKPOINT_NAME) + r"-\d+_temp(_[0-9a-f]+)?(/part)?$")


class RunDirectoryError(UsageError):
    """The training directory cannot be used as it is; the message says why in one line."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _read_lock(path: str) -> dict | None:
    """The owner written in a lock file; None when it cannot be read (half-written)."""
    try:
        with open(path) as handle:
            owner = json.load(handle)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _is_stale(owner: dict | None) -> bool:
    """Whether the owner of a lock is certainly gone: a dead pid on this host and boot."""
    if owner is None:
        return True
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process: it cannot be checked from here
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return True
    return owner["pid"] != os.getpid() and not process_alive(owner["pid"])


@contextlib.contextmanager
def locked(directory: str) -> Iterator[str]:
    """Holds `directory/run.lock` while the block runs: one training per directory.

    The lock file is made whole under a temporary name and linked into place, which
    fails if it exists. A lock whose owner is gone (its pid dead on this host, or the
    machine rebooted since) is taken over with a warning; a live owner's is an error.

    Raises:
      RunDirectoryError: naming the owner's pid, host and start time.
    """
    path = os.path.join(directory, LOCK_FILE)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec="seconds"),
             "command": " ".join(sys.argv)}
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temporary, "w") as handle:
            json.dump(owner, handle)
    except OSError as error:
        raise RunDirectoryError(f"{directory} cannot be written to: {error.strerror}") from None
    try:
        for _ in range(2):
            try:
                os.link(temporary, path)
                break
            except FileExistsError:
                other = _read_lock(path)
                if not _is_stale(other):
                    raise RunDirectoryError(
                        f"{directory} is in use by process {other['pid']} on {other['host']} "
                        f"(since {other.get('started', '?')}); wait for it to end or use "
                        f"another directory (if that process is gone, remove {path})"
                    ) from None
                print(f"warning: {path}: taking over the lock of "
                      f"{'a run' if other is None else 'process ' + str(other['pid'])} "
                      "that is gone", file=sys.stderr)
                # Renamed onto a private name first: of two runs taking over the same stale
                # lock, the second gives back the lock the first has made meanwhile.
                stale = temporary + ".stale"
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, stale)
                    if _read_lock(stale) != other:
                        os.replace(stale, path)
                    else:
                        os.remove(stale)
        else:
            raise RunDirectoryError(f"{path}: could not take the lock; try again")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    try:
        yield path
    finally:
        if (_read_lock(path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def remove_leftovers(directory: str) -> list[str]:
    """Removes the temporary files and folders this package's killed writers left.

    Call it while holding the lock (`locked`): a live run's temporary files look the same.
    Returns the removed paths.
    """
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and _TEMP_DIR.match(name):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isfile(path) and _TEMP_FILE.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            continue
        removed.append(path)
    return removed


def _state_paths(directory: str) -> list[str] | None:
    """The checkpoints the state file lists, newest last; None if it is absent or garbled."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (ValueError, tf.errors.OpError):
        return None
    if state is None or not state.model_checkpoint_path:
        return None
    paths = [path for path in state.all_model_checkpoint_paths
             if path != state.model_checkpoint_path]
    return [*paths, state.model_checkpoint_path]


def _write_state(directory: str, paths: list[str]) -> None:
    # With their times, so that tf.train.CheckpointManager's retention takes them in hand
    # (without, it counts them as "preserved" and never deletes them).
    times = [os.path.getmtime(path + ".index") for path in paths]
    tf.compat.v1.train.update_checkpoint_state(
        directory, paths[-1], paths, all_model_checkpoint_timestamps=times,
        last_preserved_timestamp=min(times) - 1)


def repair_state(directory: str, exclude: tuple[str, ...] = (), write: bool = True
                 ) -> str | None:
    """Makes the state file list the complete checkpoints on disk if it does not already.

    A state file that is garbled, empty, absent while checkpoints exist, or that names a
    checkpoint whose files are gone is rewritten (atomically) to list the complete
    checkpoints on disk, newest last, with a warning; `exclude` are checkpoints known to
    be damaged. Returns the newest checkpoint listed, or None when there is none. With
    `write` False (a worker that is not the chief) nothing is written: the same newest
    checkpoint is only found.
    """
    complete = [path for path in complete_checkpoints(directory) if path not in exclude]
    listed = _state_paths(directory)
    if listed is not None:
        # The state file names paths as written, relative or absolute: compare them whole.
        on_disk = {os.path.abspath(path): path for path in complete}
        resolved = [os.path.abspath(path) for path in listed]
        if all(path in on_disk for path in resolved) and (
                checkpoint_step(resolved[-1]) >= checkpoint_step(complete[-1])):
            return on_disk[resolved[-1]]
    if not complete:
        if write and os.path.exists(os.path.join(directory, STATE_FILE)):
            os.remove(os.path.join(directory, STATE_FILE))
        return None
    if not write:
        return complete[-1]
    print(f"warning: {os.path.join(directory, STATE_FILE)} is missing or does not list the "
          f"complete checkpoints on disk; rewritten to resume from {complete[-1]}",
          file=sys.stderr)
    _write_state(directory, complete)
    return complete[-1]


@tf.function
def _all_finite(variables: list[tf.Variable]) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])


def all_finite(variables: list[tf.Variable]) -> bool:
    """Whether every floating point variable of `variables` is finite (no NaN or inf)."""
    floats = [v for v in variables if tf.as_dtype(v.dtype).is_floating]
    return not floats or bool(_all_finite(floats))


def restore_newest(checkpoint: tf.train.Checkpoint, directory: str,
                   variables: list[tf.Variable], write: bool = True) -> str | None:
    """Restores the newest checkpoint of `directory` that reads back whole and finite.

    Repairs the state file first (`repair_state`; with `write` False, as on a worker
    that is not the chief, it is only read). A checkpoint that cannot be read
    (truncated or corrupt) or holds NaN or infinite `variables` is skipped with a warning
    and the next older one tried, and the state file lists only the good ones. Returns the
    restored checkpoint, or None for a directory without checkpoints.

    Raises:
      RunDirectoryError: when checkpoints exist but none can be restored (training would
        otherwise start again from step 0 over them), or one does not fit the model.
    """
    damaged: list[str] = []
    while (path := repair_state(directory, tuple(damaged), write)) is not None:
        try:
            status = checkpoint.restore(path)
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError) as error:  # unmatched objects, other shapes
            raise RunDirectoryError(
                f"checkpoint {path} does not fit this model: {str(error).splitlines()[0]}"
            ) from None
        except READ_ERRORS as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"warning: checkpoint {path} cannot be read ({reason}); trying an older one",
                  file=sys.stderr)
            damaged.append(path)
            continue
        if all_finite(variables):
            return path
        print(f"warning: checkpoint {path} holds NaN or infinite weights; trying an older one",
              file=sys.stderr)
        damaged.append(path)
    names = os.listdir(directory) if os.path.isdir(directory) else []  # (not made yet)
    leftover = sorted(name for name in names if name.startswith(CHECKPOINT_NAME + "-"))
    if damaged or leftover:
        raise RunDirectoryError(
            f"no checkpoint of {directory} can be restored "
            f"({', '.join(damaged) + ' damaged' if damaged else 'incomplete: ' + leftover[0]}); "
            "move them away to start again from step 0"
        )
    return None


def run_config(directory: str) -> dict | None:
    """The content of the run file of `directory` (`checkpoints.RUN_FILE`), None if absent.

    Raises:
      RunDirectoryError: if it cannot be read as JSON.
    """
    path = os.path.join(directory, RUN_FILE)
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise RunDirectoryError(f"{path} cannot be read: {error}") from None


def _settings(content: dict) -> dict:
    """The settings of a run file that a resumed run must keep, flat: the model, its config
    (config.NAME), the hparams by name and the SETTINGS_FLAGS. Older run files (flags at
    the top level, no config) give what they hold, and the hparams added since
    (`ADDED_FIELDS`) at the values their run trained with."""
    known = models.MODELS.get(content.get("model"))
    out = {**(known.hparams_class.ADDED_FIELDS if known else {}), **content.get("hparams", {})}
    if content.get("model") is not None:
        out["model"] = content["model"]
    for key, value in (content.get("config") or {}).items():
        if key != "name":
            out[f"config.{key}"] = value
    flags = content.get("flags", content)
    out.update({key: flags[key] for key in SETTINGS_FLAGS if key in flags})
    return out


def config_changes(saved: dict, content: dict) -> dict[str, tuple]:
    """{name: (saved value, new value)} of the settings (`_settings`) that differ between two
    run files; a setting one of them lacks (an older run file) is not compared."""
    old, new = _settings(saved), _settings(content)
    return {key: (old[key], new[key]) for key in sorted(set(old) & set(new))
            if old[key] != new[key]}


def resumed_config(directory: str, content: dict, step: int,
                   allow_changes: bool = False) -> dict:
    """The run file to write for a run of run-file `content` resumed at `step`: a resumed
    run (step > 0) must keep the settings of the run file in `directory`.

    Args:
      content: the new run file (`checkpoints.run_file_content`).
      step: the step resumed at (0: a new run, whose run file replaces any there).
      allow_changes: let a resumed run change settings; the changes are appended to the
        run file's "resumed_with_changes" list as {"step", "changes": {name: [old, new]}}.

    Raises:
      RunDirectoryError: listing the differences, when resuming with other settings and
        changes are not allowed.
    """
    saved = run_config(directory) if step > 0 else None
    content = dict(content)
    if saved is not None:
        changes = config_changes(saved, content)
        if changes and not allow_changes:
            listed = ", ".join(f"{key}: {old!r} -> {new!r}"
                               for key, (old, new) in changes.items())
            raise RunDirectoryError(
                f"{os.path.join(directory, RUN_FILE)}: resuming at step {step} with other "
                f"settings than the run's ({listed}); use the run's settings, another "
                "directory, or allow the change (--allow_hparams_change)"
            )
        history = list(saved.get(CHANGES_KEY, []))
        if changes:
            history.append({"step": step, "changes": {key: list(pair)
                                                      for key, pair in changes.items()}})
        if history:
            content[CHANGES_KEY] = history
    return content
