"""Errors lemo_ds raises for bad input: each message names what is wrong and how to fix it."""


class LemoError(Exception):
    """Base class of lemo_ds errors."""


class LemoConfigError(LemoError, ValueError):
    """A bad "lemo" config section, DeepSpeed config path or model/config combination."""


class LemoInputError(LemoError, ValueError):
    """A batch lemo_ds cannot process (for example a sequence shorter than one block)."""


class UnsupportedModelError(LemoError, TypeError):
    """A model family without an injection policy."""
