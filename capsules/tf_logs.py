"""Quiet TensorFlow's logs in the command-line tools: their output is their results.

TensorFlow's C++ code logs through absl, which writes every message to stderr until
absl::InitializeLog() is called, whatever TF_CPP_MIN_LOG_LEVEL says: importing TensorFlow
2.21 prints absl's "WARNING: All log messages before absl::InitializeLog() ..." line, the
oneDNN notice and "Could not find cuda drivers" (twice: two of its libraries carry absl).
TF_CPP_MIN_LOG_LEVEL holds back only the later ones (cpu_feature_guard, cuInit's error).
So `quiet_tensorflow_logs` sets the level (3, unless the user set one) and imports
TensorFlow with the stderr file descriptor captured, writing back all but the log lines
below the level, and holds back the INFO lines of TensorFlow's Python modules (absl.logging).
TF_CPP_MIN_LOG_LEVEL=0 gets every line back.

This module must not import TensorFlow (nor anything that does) at its top.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from absl import logging as absl_logging

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# The tools' level: INFO, WARNING and ERROR held back (3 is TensorFlow's FATAL).
QUIET_LEVEL = "3"
# absl's log lines, "I0000 00:00:1796575883.573464    3597 port.cc:153] text": the letter
# is the severity (INFO, WARNING, ERROR, FATAL, TensorFlow's levels 0 to 3).
_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]\s]+:\d+\] ")
_SEVERITIES = "IWEF"
# absl's notice before the first message of each of its copies: it says where the log lines
# go, so it is held back with the least of them (INFO).
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"


def log_level() -> int:
    """The C++ log level TF_CPP_MIN_LOG_LEVEL asks for (0, all, when unset or not a number)."""
    try:
        return int(os.environ.get(LEVEL_VARIABLE, "0"))
    except ValueError:
        return 0


def held_back(line: str, level: int) -> bool:
    """Whether `line` of stderr is a TensorFlow (absl) log line below `level`."""
    if line.startswith(_ABSL_NOTICE):
        return level > 0
    match = _LOG_LINE.match(line)
    return bool(match) and _SEVERITIES.index(match.group(1)) < level


@contextlib.contextmanager
def _stderr_filtered(level: int) -> Iterator[None]:
    """Captures what is written to file descriptor 2 (C++ and Python alike) in the block and
    writes it back afterwards, in order, without the lines `held_back` at `level`."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr: nothing to quiet
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not held_back(line, level)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def quiet_tensorflow_logs() -> None:
    """Imports TensorFlow with its C++ logs at TF_CPP_MIN_LOG_LEVEL, 3 unless the user set it.

    Call it at the top of a command, before anything imports TensorFlow; once TensorFlow is
    imported (a program that uses the package, a test) it does nothing.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault(LEVEL_VARIABLE, QUIET_LEVEL)
    level = log_level()
    if level <= 0:
        return
    # TensorFlow's Python modules log through absl.logging (a line per checkpoint saved),
    # which absl.app sets to INFO: WARNING and above only (absl's --verbosity still rules).
    absl_logging.set_verbosity(absl_logging.WARNING)
    with _stderr_filtered(level):
        import tensorflow  # noqa: F401
