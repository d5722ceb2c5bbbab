"""Errors lemo_ds raises for bad input: each message names what is wrong and how to fix it."""

from __future__ import annotations

import sys


class LemoError(Exception):
    """Base class of lemo_ds errors."""


class LemoConfigError(LemoError, ValueError):
    """A bad "lemo" config section, DeepSpeed config path or model/config combination."""


class LemoInputError(LemoError, ValueError):
    """A batch lemo_ds cannot process (for example a sequence shorter than one block)."""


class UnsupportedModelError(LemoError, TypeError):
    """A model family without an injection policy."""


def error_line(error: BaseException) -> str:
    """The one line a launcher prints for a stop: "lemo_ds: error: " and the message with its lines joined (after a
    line ending in ":" with a space, else with "; "), so that a log shows each stop as one line per rank."""
    message = ""
    for line in filter(None, (part.strip() for part in str(error).splitlines())):
        message += line if not message else (" " if message.endswith(":") else "; ") + line
    return f"lemo_ds: error: {message}"


def write_line(line: str) -> None:
    """``line`` and its newline on stderr in one write. The deepspeed launcher runs every rank as ``python -u``, where
    print() writes the text and its newline in two writes: two ranks' error lines on one pipe then ran together on one
    line (seen in CI). One write of a line under the pipe's atomic size (4 KiB) is never split."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def print_error_line(error: BaseException) -> None:
    """``error_line(error)`` on stderr, as one write (``write_line``)."""
    write_line(error_line(error))
