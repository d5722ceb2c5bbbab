"""The error of the training job's own setup checks (data, model, flags)."""

from lemo_ds.errors import LemoError


class TrainingSetupError(LemoError, ValueError):
    """Bad input to launch/train.py; the message names what is wrong and how to fix it."""
