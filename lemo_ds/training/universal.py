"""Resume on another number of ranks: a checkpoint tag converted to DeepSpeed's universal checkpoint.

ZeRO saves the optimizer state (and under ZeRO-3 the weights) partitioned per data-parallel rank, so a tag written
by N ranks loads only on N ranks. DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``,
ZeRO stages 1 to 3) stores every trainable parameter's fp32 weight and Adam moments whole,
one folder per parameter, and any number of ranks cuts its own partitions out of it on load
(``"checkpoint": {"load_universal": true}`` in the DeepSpeed config).

The conversion is written inside the tag it comes from, ``step{N}/universal/``: retention deletes it with its tag,
and the tag's own files (and its completion marker's checksums) are left as they were. It is made once, by rank 0,
into a temporary folder that is renamed into place when whole, so a job killed mid-conversion leaves no folder a
later resume would trust; the next resume removes the leftover and converts again. Only the trainable parameters
are in it (DeepSpeed's converter reads the optimizer's partitions): LoRA's frozen base comes from ``--model`` and
the seed, as it does on every resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from lemo_ds import atomic_io

UNIVERSAL = "universal"  # the converted checkpoint's folder inside its tag
_DONE = "lemo_ds_universal_done"  # written last into the temporary folder, before the rename


def converted(tag_dir: Path) -> Path | None:
    """The tag's universal checkpoint if a whole one exists."""
    folder = Path(tag_dir) / UNIVERSAL
    return folder if (folder / _DONE).is_file() else None


def convert(tag_dir: Path) -> Path:
    """Convert ``tag_dir`` (a ZeRO checkpoint tag) to ``tag_dir/universal`` unless that exists; returns it.

    One process only (rank 0: the others wait for its verdict). Runs DeepSpeed's converter in a child process, so its
    worker pools and prints stay out of the training process; raises RuntimeError with the converter's last lines."""
    tag_dir = Path(tag_dir)
    done = converted(tag_dir)
    if done is not None:
        return done
    target = tag_dir / UNIVERSAL
    tmp = tag_dir / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion killed halfway
    shutil.rmtree(target, ignore_errors=True)  # a folder without its done-marker is one too
    # --inject_missing_state: DeepSpeed's converter wants the "universal_checkpoint_info" that only Megatron-DeepSpeed
    # clients save; its content is the format version, which the flag supplies. One worker each: the conversion
    # shares the machine with the ranks waiting for it.
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    # The converter also names its output in a 'latest_universal' file beside it, for loads without a tag; lemo_ds
    # loads by tag, and the tag's folder stays as it was saved.
    (tag_dir / "latest_universal").unlink(missing_ok=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = (result.stderr or result.stdout or "no output").strip().splitlines()
        raise RuntimeError(f"DeepSpeed's universal-checkpoint conversion of {tag_dir} failed: {lines[-1].strip()}")
    for path in sorted(tmp.rglob("*")):  # on disk before the done-marker that vouches for them
        if path.is_file():
            atomic_io.fsync(path)
    (tmp / _DONE).write_text("converted by deepspeed.checkpoint.ds_to_universal\n", encoding="utf-8")
    atomic_io.fsync(tmp / _DONE)
    os.replace(tmp, target)
    atomic_io.fsync(tag_dir)
    return target

