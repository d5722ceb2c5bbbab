"""The error of the training job's own setup checks (data, model, flags)."""

from lemo_ds.errors import LemoError


class TrainingSetupError(LemoError, ValueError):
    """Bad input to launch/train.py; the message names what is wrong and how to fix it."""


class TrainingStopped(LemoError, RuntimeError):
    """The job stopped on purpose mid-run (a non-finite loss or state, a save the disk refused) without saving
    anything bad; the message says what happened and what the last good checkpoint is."""

    exit_code = 3
