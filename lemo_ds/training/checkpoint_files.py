"""What a checkpoint's completion marker vouches for: every file's size and SHA-256, and checking them again.

A checkpoint can be damaged after it was completed (a truncated copy, a bad disk, a file edited by hand); the
marker alone cannot tell. The ranks that write a tag hash its files (each a share, the same share it fsyncs)
and the marker lists them; a resume hashes them again (each rank a share) before loading, so a damaged tag is
named and skipped instead of failing inside torch.load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def digest(path: Path) -> list:
    """[size in bytes, sha256 hex] of one file."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return [size, sha.hexdigest()]


def manifest_share(tag_dir: Path, files: list[Path], rank: int, world_size: int) -> dict[str, list]:
    """This rank's share of the tag's manifest: {path relative to the tag: [size, sha256]}."""
    return {path.relative_to(tag_dir).as_posix(): digest(path) for path in files[rank::world_size]}


def damaged_files(tag_dir: Path, manifest: dict[str, list], rank: int, world_size: int) -> list[str]:
    """This rank's share of the manifest checked against the disk: one line per missing or changed file."""
    problems = []
    for name in sorted(manifest)[rank::world_size]:
        path = tag_dir / name
        size, sha = manifest[name]
        try:
            actual_size = path.stat().st_size
            if actual_size != size:
                problems.append(f"{name}: {actual_size} bytes, the marker says {size}")
            elif digest(path)[1] != sha:
                problems.append(f"{name}: SHA-256 differs from the marker's")
        except OSError as error:
            problems.append(f"{name}: {error.strerror or error}")
    return problems
