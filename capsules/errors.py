"""The project's user-facing errors: the command-line drivers print these in one line.

So do what the operating system or TensorFlow's file system say of a file or folder that
cannot be read or written (`FILE_ERRORS`). Anything else (a bug, an error of a computation)
keeps its traceback.
"""

import re

import tensorflow as tf


class UsageError(ValueError):
    """A flag, argument, file or checkpoint the user must change."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user named (or must make first) does not exist."""


# An unwritable --summary_dir, a checkpoint file that cannot be read: not bugs of the program.
FILE_ERRORS = (OSError, tf.errors.PermissionDeniedError, tf.errors.NotFoundError,
               tf.errors.DataLossError, tf.errors.AlreadyExistsError)


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
