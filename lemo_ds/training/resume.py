"""DeepSpeed checkpoints of the training job: written atomically, resumed from the latest complete one.

A job can be killed at any moment (a pre-empted or timed-out Slurm job, a failed node), also halfway
through writing a checkpoint, so a tag directory only counts once it is known to be whole:

1. every rank writes its partition with ``engine.save_checkpoint(OUTPUT_DIR/checkpoints, tag="step{N}",
   save_latest=False)`` (DeepSpeed's own ``latest`` would name the tag before anyone checked it);
2. each rank flushes its share of the tag's files to disk, then a barrier;
3. rank 0 writes the completion marker ``step{N}/lemo_ds_complete.json``, then points ``latest`` at the tag;
   both by write-to-temp, fsync, ``os.replace``, fsync of the directory, so each is old or new, never torn.

Resuming takes ``latest`` if it names a complete tag, else the newest complete tag; tags without the marker
are ignored and reported. The client state carries what the engine does not know: the step and how many
global rows of the packed data stream were consumed, so a resumed run continues the data exactly where the
checkpoint left it (model, optimizer, LR scheduler and ``engine.global_steps``, which drives the lemo
keep-ratio schedule, come back with the engine).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lemo_ds.training.errors import TrainingSetupError

LATEST = "latest"
COMPLETE = "lemo_ds_complete.json"
AUTO = "auto"  # --resume auto: resume if a complete checkpoint exists, else start fresh (a requeued job)
_MUST_MATCH = ("seq_len", "seed", "data", "model", "lora_r")


@dataclass(frozen=True)
class Found:
    """What a checkpoint folder holds: the tag to resume from (None: nothing complete) and the tags to skip."""

    tag: str | None
    step: int | None = None
    incomplete: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def find_checkpoint(ckpt_dir: Path) -> Found:
    """The tag to resume from: ``latest`` if it names a complete tag, else the newest complete one.

    Local reads only (no collective), so it can run before the process group exists.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return Found(None)
    complete: dict[str, int] = {}
    incomplete = []
    for tag_dir in sorted(path for path in ckpt_dir.iterdir() if path.is_dir()):
        step = _completed_step(tag_dir)
        if step is None:
            incomplete.append(tag_dir.name)
        else:
            complete[tag_dir.name] = step
    notes = []
    latest = _read_latest(ckpt_dir)
    if latest in complete:
        return Found(latest, complete[latest], tuple(incomplete))
    if latest is not None:
        notes.append(f"'{LATEST}' names {latest!r}, which is not a complete checkpoint")
    if not complete:
        return Found(None, None, tuple(incomplete), tuple(notes))
    tag = max(complete, key=lambda name: (complete[name], name))
    return Found(tag, complete[tag], tuple(incomplete), tuple(notes))


def require_checkpoint(ckpt_dir: Path) -> None:
    """--resume without a complete checkpoint to resume from is an error (checked before any collective)."""
    found = find_checkpoint(ckpt_dir)
    if found.tag is not None:
        return
    if found.incomplete:
        raise TrainingSetupError(
            f"--resume: no complete checkpoint in {ckpt_dir} ({_describe_incomplete(found.incomplete)}); "
            "run without --resume to start over, or use --resume auto"
        )
    raise TrainingSetupError(
        f"--resume: no checkpoint in {ckpt_dir}; run without --resume first (or with --resume auto), or point "
        "--output-dir at the run to continue"
    )


def save(engine: Any, ckpt_dir: Path, step: int, rows_consumed: int, args: argparse.Namespace) -> None:
    """Write checkpoint ``step{N}`` (a collective: every rank calls it) and mark it complete."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step}"
    tag_dir = ckpt_dir / tag
    rank, world_size = _rank_and_size()
    if rank == 0:
        # Overwriting a tag (a run restarted in the same folder): it is incomplete until its new marker lands.
        # save_checkpoint starts with a barrier, so no rank writes into the folder before this removal.
        (tag_dir / COMPLETE).unlink(missing_ok=True)
    state = {"step": step, "rows_consumed": rows_consumed, **{key: getattr(args, key) for key in _MUST_MATCH}}
    # save_latest=False: DeepSpeed would write 'latest' itself, without fsync and before the marker.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"lemo_ds_train": state}, save_latest=False)
    # The marker must not reach the disk before the data it vouches for: every rank flushes a share of the
    # files (all ranks see the same list: save_checkpoint ends with a barrier), then all wait for each other.
    files = sorted(path for path in tag_dir.rglob("*") if path.is_file())
    for path in files[rank::world_size]:
        _fsync(path)
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        for folder in sorted({path.parent for path in files}, reverse=True):
            _fsync(folder)
        marker = {"tag": tag, "step": step, "rows_consumed": rows_consumed, "world_size": world_size,
                  "files": len(files), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        write_text_atomic(tag_dir / COMPLETE, json.dumps(marker, indent=2) + "\n")
        write_text_atomic(ckpt_dir / LATEST, tag)


def load(engine: Any, ckpt_dir: Path, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Load the checkpoint ``find_checkpoint`` picks into ``engine``; returns its step and data position.

    Rank 0 picks and tells the others, so every rank loads the same tag even where a shared filesystem
    shows them the folder at different moments. None: ``--resume auto`` and no complete checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    found = _from_rank0(find_checkpoint(ckpt_dir) if _rank_and_size()[0] == 0 else None)
    for note in found.notes:
        log(f"warning: {note}")
    if found.incomplete:
        log(f"ignoring {_describe_incomplete(found.incomplete)}")
    if found.tag is None:
        if args.resume == AUTO:
            log(f"--resume auto: no complete checkpoint in {ckpt_dir}, starting from step 0")
            return None
        raise TrainingSetupError(f"--resume: no complete checkpoint in {ckpt_dir}")
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=found.tag)
    state = (client_state or {}).get("lemo_ds_train")
    if path is None or state is None:
        raise TrainingSetupError(f"--resume: {ckpt_dir / found.tag} holds no checkpoint written by launch/train.py")
    changed = [
        f"{key} {state[key]!r} -> {getattr(args, key)!r}" for key in _MUST_MATCH if state.get(key) != getattr(args, key)
    ]
    if changed:
        log(f"warning: resuming with changed settings ({'; '.join(changed)}): the data order will not continue exactly")
    log(f"resumed from {ckpt_dir / found.tag} at step {state['step']} ({state['rows_consumed']} rows consumed)")
    return state


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (and a later job, after a crash) see the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself is only durable once the directory is


# ---- helpers ---------------------------------------------------------------------------------------------


def _completed_step(tag_dir: Path) -> int | None:
    """The step a complete tag holds, None without a (readable) marker."""
    try:
        return int(json.loads((tag_dir / COMPLETE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _describe_incomplete(tags: tuple[str, ...]) -> str:
    return f"incomplete checkpoint{'s' if len(tags) > 1 else ''} without {COMPLETE}: {', '.join(tags)}"


def _fsync(path: Path) -> None:
    """fsync a file or directory; filesystems that cannot fsync a read-only descriptor or a folder are let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _from_rank0(found: Found | None) -> Found:
    if _rank_and_size()[1] == 1:
        assert found is not None
        return found
    box = [found]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
