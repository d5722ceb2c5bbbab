"""The output folder before the job starts: never train over an earlier run by accident, and fail early
(before any collective, on every rank) where the folder cannot be written."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch

from lemo_ds import distributed
from lemo_ds.training.errors import TrainingSetupError

# What a run leaves behind (launch/train.py): a new run without --resume would cut or replace each of them.
RUN_FILES = ("metrics.jsonl", "summary.json")
CHECKPOINTS = "checkpoints"


def earlier_run(output_dir: Path) -> list[str]:
    """The names in ``output_dir`` that show an earlier run (empty: none)."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    ckpt_dir = output_dir / CHECKPOINTS
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        found.append(f"{CHECKPOINTS}/")
    return found


def refuse_earlier_run(output_dir: Path) -> None:
    found = earlier_run(output_dir)
    if found:
        raise TrainingSetupError(
            f"--output-dir {output_dir} holds an earlier run ({', '.join(found)}); continue it with --resume, "
            "start over there with --overwrite (deletes those), or choose another --output-dir"
        )


def clear_earlier_run(output_dir: Path) -> None:
    """Remove what an earlier run left in ``output_dir``."""
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)


def start_over(output_dir: Path) -> None:
    """--overwrite, once the process group is up (a collective: every rank calls it): rank 0 clears the earlier
    run while the others wait, so that no rank probes or reads the folder half deleted, and a failure to clear it
    stops every rank with the same one line."""
    rank = distributed.rank()
    several = distributed.world_size() > 1
    if several:
        torch.distributed.barrier()  # every rank is past its own checks of the folder (describe, before any collective)
    failure = None
    if rank == 0:
        try:
            clear_earlier_run(output_dir)
        except OSError as error:
            failure = f"{error.filename or output_dir}: {error.strerror or error}"
    box = [failure]
    if several:
        torch.distributed.broadcast_object_list(box, src=0)  # the others wait here until the folder is clear
    if box[0] is not None:
        raise TrainingSetupError(f"--overwrite: cannot delete the earlier run in {output_dir} ({box[0]})")


def require_writable(folder: Path, flag: str = "--output-dir") -> None:
    """Create ``folder`` and write a probe file in it; any OSError becomes a one-line setup error."""
    probe = folder / f".lemo_ds_write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as error:
        where = error.filename or folder
        raise TrainingSetupError(
            f"{flag} {folder}: cannot write there ({where}: {error.strerror or error}); choose a writable folder"
        ) from None
