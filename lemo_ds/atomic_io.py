"""Atomic file writes: a reader, or a later job after a crash, sees the old file or the new one, never a partial one.

The new content goes to a temporary file beside the target (same folder, so the rename never crosses filesystems),
is fsynced, and is renamed over the target with ``os.replace``; then the folder is fsynced, since the rename itself
is only durable once the folder is. A write that fails leaves the old file as it was and removes the temporary one.

It lives at the package's top level because both the library (the predictor scorer's checkpoint files) and the
training job (checkpoint markers, ``latest``, summary.json) use it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, writer: Callable[[str], Any]) -> None:
    """Replace ``path`` with the file ``writer(temporary path)`` writes, for writers that want a path of their own
    (``torch.save``, safetensors' ``save_file``). If ``writer`` raises, ``path`` is untouched and the temporary file
    is removed."""
    path = Path(path)
    # Hidden and named after the process, so a listing of the folder skips it and two processes writing the same
    # target do not share one temporary file.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writer(str(tmp))
        fsync(tmp)  # the data must be on disk before the rename can make it the target
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left after a failure: the rename consumed it otherwise
    fsync(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    write_atomically(path, write)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    write_bytes_atomic(path, text.encode(encoding))


def fsync(path: str | os.PathLike) -> None:
    """fsync a file or folder; filesystems that cannot fsync a read-only descriptor or a folder are let be."""
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
