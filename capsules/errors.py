"""The project's user-facing errors: the command-line drivers print these in one line.

So do what the operating system or TensorFlow's file system say of a file or folder that
cannot be read or written (`FILE_ERRORS`). Anything else (a bug, an error of a computation)
keeps its traceback.
"""

import errno
import re

import tensorflow as tf


class UsageError(ValueError):
    """A flag, argument, file or checkpoint the user must change."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user named (or must make first) does not exist."""


# An unwritable --summary_dir, a checkpoint file that cannot be read: not bugs of the program.
FILE_ERRORS = (OSError, tf.errors.PermissionDeniedError, tf.errors.NotFoundError,
               tf.errors.DataLossError, tf.errors.AlreadyExistsError)


class DiskFullError(OSError):
    """A write found no space left on the device; the message names the folder."""


# How TensorFlow's file system ends an ENOSPC error (a ResourceExhaustedError, like an
# out-of-memory one, which must keep its traceback).
_NO_SPACE = "No space left on device"


def disk_full(error: BaseException) -> bool:
    """Whether `error`, the system's or TensorFlow's, says that the device is full."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return isinstance(error, tf.errors.ResourceExhaustedError) and _NO_SPACE in str(error)


class DataReadError(RuntimeError):
    """Reading a data set failed part way; the original TensorFlow error is its __cause__."""


_TF_NOISE = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$|"
                       r"\s*\[\[\{\{node [^}]*\}\}\]\].*$")
_ASSERTION = re.compile(r"assertion failed: \[(.*?)\]", re.IGNORECASE | re.DOTALL)


def error_line(error: BaseException) -> str:
    """A TensorFlow error in one line: its message without op names, or an assertion's text."""
    text = str(getattr(error, "message", None) or error)
    assertion = _ASSERTION.search(text)
    if assertion:
        return assertion.group(1).strip()
    lines = [_TF_NOISE.sub("", line).strip() for line in text.strip().splitlines()]
    return next((line for line in lines if line), type(error).__name__)
