"""The output folder before the job starts: never train over an earlier run by accident, and fail early
(before any collective, on every rank) where the folder cannot be written.

One earlier run is no obstacle: one that stopped (exit 3: a NaN loss, a full disk) before its first complete
checkpoint. There is nothing to continue, so the same command run again starts over; its metrics.jsonl and
summary.json are first moved to OUTPUT_DIR/stopped_runs/, not deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lemo_ds import distributed
from lemo_ds.training.errors import TrainingSetupError

# What a run leaves behind (launch/train.py): a new run without --resume would cut or replace each of them.
RUN_FILES = ("metrics.jsonl", "summary.json")
CHECKPOINTS = "checkpoints"
STOPPED_RUNS = "stopped_runs"  # where a rerun puts the files of a run that stopped before its first checkpoint
STOPPED = "stopped"  # summary.json's "status" of a run that stopped on purpose (exit 3); "done" otherwise


def earlier_run(output_dir: Path) -> list[str]:
    """The names in ``output_dir`` that show an earlier run (empty: none). An empty metrics.jsonl is none: a run
    killed before its first step leaves it, with nothing in it to lose."""
    found = [name for name in RUN_FILES if _non_empty(output_dir / name)]
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


def _non_empty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def stopped_run(output_dir: Path) -> dict[str, Any] | None:
    """The summary of the earlier run in ``output_dir`` if that run stopped on purpose (a NaN loss, a save the disk
    refused); None otherwise (no summary, or a run that finished)."""
    try:
        summary = json.loads((Path(output_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == STOPPED else None


def describe_stop(summary: dict[str, Any]) -> str:
    """'stopped at step 3 (the loss is nan at step 3)': how an earlier run ended, for one line of log or error."""
    reason = str(summary.get("stop_reason") or "").split(";")[0]
    return f"stopped at step {summary.get('stopped_at_step')}" + (f" ({reason})" if reason else "")


def set_aside_stopped_run(output_dir: Path) -> Path:
    """Move the stopped run's metrics.jsonl and summary.json to OUTPUT_DIR/stopped_runs/<its step and end time>/
    (a collective: every rank calls it; rank 0 moves them while the others wait) and return that folder."""
    summary = stopped_run(output_dir) or {}
    folder = Path(output_dir) / STOPPED_RUNS / f"step{summary.get('stopped_at_step')}-{summary.get('ended_at', '')}"
    if folder.exists():
        folder = folder.with_name(f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")

    def move() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if (Path(output_dir) / name).exists():
                os.replace(Path(output_dir) / name, folder / name)

    failure = _on_rank0_then_all(move, output_dir)
    if failure is not None:
        raise TrainingSetupError(f"cannot set the stopped run in {output_dir} aside ({failure})")
    return folder


def clear_earlier_run(output_dir: Path) -> None:
    """Remove what an earlier run left in ``output_dir``."""
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)


def start_over(output_dir: Path) -> None:
    """--overwrite, once the process group is up (a collective: every rank calls it): rank 0 clears the earlier
    run while the others wait, so that no rank probes or reads the folder half deleted, and a failure to clear it
    stops every rank with the same one line."""
    failure = _on_rank0_then_all(lambda: clear_earlier_run(output_dir), output_dir)
    if failure is not None:
        raise TrainingSetupError(f"--overwrite: cannot delete the earlier run in {output_dir} ({failure})")


def _on_rank0_then_all(action: Callable[[], None], output_dir: Path) -> str | None:
    """Run ``action`` on rank 0 once every rank is past its own checks of the folder (describe, before any
    collective), while the others wait; every rank gets the same failure text (None: done)."""
    rank = distributed.rank()
    several = distributed.world_size() > 1
    if several:
        torch.distributed.barrier()
    failure = None
    if rank == 0:
        try:
            action()
        except OSError as error:
            failure = f"{error.filename or output_dir}: {error.strerror or error}"
    box = [failure]
    if several:
        torch.distributed.broadcast_object_list(box, src=0)  # the others wait here until rank 0 is done
    return box[0]


def require_writable(folder: Path, flag: str = "--output-dir") -> None:
    """Create ``folder`` and write a probe file in it; any OSError becomes a one-line setup error."""
    problem = writable_problem(folder, flag)
    if problem is not None:
        raise TrainingSetupError(problem.message())


@dataclass(frozen=True)
class Unwritable:
    """A folder this rank cannot write: the flag that names it, the folder, the cause."""

    flag: str
    folder: str
    cause: str

    def message(self) -> str:
        return f"{self.flag} {self.folder}: cannot write there ({self.cause}); choose a writable folder"


def writable_problem(folder: Path, flag: str = "--output-dir") -> Unwritable | None:
    """Create ``folder`` and write a probe file in it (named by host and pid: ranks probe at once); None: done."""
    probe = folder / f".lemo_ds_write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as error:
        return Unwritable(flag, str(folder), f"{error.filename or folder}: {error.strerror or error}")
    return None


def agree_writable(problems: tuple[Unwritable, ...], node: str) -> None:
    """Every rank's verdict on the folders it must write (``problems``: this rank's, from describe), exchanged once
    the process group is up (a collective): where any rank cannot write, every rank raises the same one-line
    TrainingSetupError, before any training. On one machine all ranks see the same folders; across nodes a folder
    may be writable on one node and not on another (a local disk, a mount one node lacks or has read-only), and the
    ranks that could write would otherwise train on until their first save, or wait for the others forever."""
    verdicts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(verdicts, (node, problems))
    failing = [(rank, where, found[0]) for rank, (where, found) in enumerate(verdicts) if found]
    if not failing:
        return
    if len(failing) == len(verdicts) and len({where for _, where, _ in failing}) == 1:
        raise TrainingSetupError(problems[0].message())  # one node, all alike: as a job of one rank says it
    first = failing[0][2]
    ranks_by_node: dict[str, list[int]] = {}
    for rank, where, problem in failing:
        if problem.folder == first.folder:
            ranks_by_node.setdefault(where, []).append(rank)
    cannot = "; ".join(f"on node {node} ({distributed.describe_ranks(ranks)})" for node, ranks in ranks_by_node.items())
    can = sorted({where for where, found in verdicts if not found} - set(ranks_by_node))
    raise TrainingSetupError(
        f"{first.flag} {first.folder}: cannot write there {cannot}: {first.cause}"
        + (f", while node {', '.join(can)} can" if can else "")
        + "; every node must be able to write it: put --output-dir on a file system that all nodes share and can write"
    )
