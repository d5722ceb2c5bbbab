"""Errors lemo_ds raises for bad input: each message names what is wrong and how to fix it."""


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
