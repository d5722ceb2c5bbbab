"""Where DeepSpeed's own output goes during a job: OUTPUT_DIR/deepspeed.log, unless ``--verbose``.

A job's console is lemo_ds's lines ("lemo_ds: ...") and its progress bar. Every rank would add DeepSpeed's log
lines (accelerator detection, scheduler notices, ...), the prints of its op builds and third-party warnings
(deprecations inside transformers, peft or torch that a user cannot act on). Those go to OUTPUT_DIR/deepspeed.log
instead, one file for all ranks (each line names its rank), so nothing is lost; with ``--verbose`` they print as
DeepSpeed prints them. Warnings raised by lemo_ds itself still print.

Records logged before the output folder is known to be writable (at import, while the job checks its input) are
held in memory and written once it is; a job stopped by bad input drops them (its one error line is what counts).
The deepspeed launcher's own lines (hostfile, world info, process exits) come from the launcher process, before
and after the job: ``deepspeed --quiet`` turns those off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

DEEPSPEED_LOGGER = "DeepSpeed"
LOG_NAME = "deepspeed.log"
_FORMAT = logging.Formatter("[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s")
_OWN_CODE = (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "launch"))

_active: DeepSpeedOutput | None = None  # the job's router while ``routed`` is in force (one job per process)


class DeepSpeedOutput:
    """The router: a filter on DeepSpeed's logger and a ``warnings.showwarning`` that write to the log file."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.rank = os.environ.get("RANK", "0")
        self.pending: list[str] = []  # lines that wait for the file
        self.file: TextIO | None = None
        self._showwarning = warnings.showwarning

    def open(self, output_dir: Path) -> None:
        """Append from now on to OUTPUT_DIR/deepspeed.log (the folder exists and is writable: the job checked)."""
        if self.verbose:
            return
        self.file = open(Path(output_dir) / LOG_NAME, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        for line in self.pending:
            self.file.write(line)
        self.pending.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def write(self, text: str) -> None:
        """Text for the log, cut into lines that each name this rank. A log line that cannot be written (a full
        disk) is dropped: the job's own handling of that disk says what matters, and a log never stops a job."""
        for line in text.splitlines():
            if not line.strip():
                continue
            entry = f"[rank {self.rank}] {line}\n"
            if self.file is None:
                self.pending.append(entry)
                continue
            try:
                self.file.write(entry)
            except OSError:
                pass

    def filter(self, record: logging.LogRecord) -> bool:
        """Logger filter: the record goes to the log (False: DeepSpeed's console handler never sees it)."""
        if self.verbose:
            return True
        self.write(_FORMAT.format(record))
        return False

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self.verbose or str(filename).startswith(_OWN_CODE):
            self._showwarning(message, category, filename, lineno, file, line)
        else:
            self.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def routed(verbose: bool, held: Iterable[logging.LogRecord] = ()) -> Iterator[DeepSpeedOutput]:
    """DeepSpeed's log lines and third-party warnings go to the log while the block runs; ``held``: records logged
    before (train.py holds those of DeepSpeed's import). Everything is as it was afterwards."""
    global _active
    output = DeepSpeedOutput(verbose)
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    for record in held:
        if output.filter(record):
            logger.handle(record)
    logger.addFilter(output.filter)
    warnings.showwarning = output.showwarning
    _active = output
    try:
        yield output
    finally:
        _active = None
        warnings.showwarning = output._showwarning
        logger.removeFilter(output.filter)
        output.close()


@contextlib.contextmanager
def stdout_to_log() -> Iterator[None]:
    """What DeepSpeed prints (not logs) inside the block, e.g. "... op built successfully", goes to the log too."""
    if _active is None or _active.verbose:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        _active.write(buffer.getvalue())
