"""Checkpoint retention (--keep-checkpoints N): after each complete save, keep the newest N complete tags.

The tag ``latest`` names is never deleted, whatever N says; incomplete tags (a save that died halfway) older
than it are leftovers no resume will ever read and go too. A tag is deleted marker first, so a deletion cut
short leaves an incomplete tag (ignored by a resume), never a "complete" one with files missing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_TAG = re.compile(r"step(\d+)")


def tags_to_delete(complete: dict[str, int], incomplete: list[str], latest: str, keep: int) -> list[str]:
    """Which tags go: complete ones beyond the newest ``keep`` (0 keeps all) and incomplete ones older than
    ``latest``; never ``latest`` itself."""
    doomed = []
    if keep > 0:
        newest_first = sorted(complete, key=lambda tag: (complete[tag], tag), reverse=True)
        doomed += [tag for tag in newest_first[keep:] if tag != latest]
    latest_step = complete.get(latest)
    if latest_step is not None:
        for tag in incomplete:
            match = _TAG.fullmatch(tag)
            if match and int(match.group(1)) < latest_step:
                doomed.append(tag)
    return sorted(doomed)


def delete_tag(tag_dir: Path, marker_name: str, fsync_dir) -> None:
    (tag_dir / marker_name).unlink(missing_ok=True)
    fsync_dir(tag_dir)
    shutil.rmtree(tag_dir, ignore_errors=True)
