"""The project's user-facing errors: the command-line drivers print these in one line.

Anything else (a bug, an error of TensorFlow) keeps its traceback.
"""


class UsageError(ValueError):
    """A flag, argument, file or checkpoint the user must change."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user named (or must make first) does not exist."""
