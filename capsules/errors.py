"""The project's user-facing errors: the command-line drivers print these in one line.

Anything else (a bug, an error of TensorFlow) keeps its traceback.
"""

import re


class UsageError(ValueError):
    """A flag, argument, file or checkpoint the user must change."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user named (or must make first) does not exist."""


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
