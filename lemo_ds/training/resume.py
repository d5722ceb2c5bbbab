"""DeepSpeed checkpoints of the training job, and resuming from the latest one.

``engine.save_checkpoint(OUTPUT_DIR/checkpoints, tag="step{N}")`` (a collective: every rank writes its
partition) also writes the file ``latest`` naming the tag; ``engine.load_checkpoint`` reads it back. The
client state carries what the engine does not know: the step and how many global rows of the packed data
stream were consumed, so a resumed run continues the data exactly where the checkpoint left it (the model,
optimizer, LR scheduler and ``engine.global_steps``, which drives the lemo keep-ratio schedule, come back
with the engine).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lemo_ds.training.errors import TrainingSetupError

LATEST = "latest"
_MUST_MATCH = ("seq_len", "seed", "data", "model", "lora_r")


def require_checkpoint(ckpt_dir: Path) -> None:
    """--resume without a checkpoint to resume from is an error (checked before any collective)."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        raise TrainingSetupError(
            f"--resume: no checkpoint in {ckpt_dir} (no '{LATEST}' file); run without --resume first, or point "
            "--output-dir at the run to continue"
        )
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise TrainingSetupError(f"--resume: {latest} names checkpoint {tag!r}, but {ckpt_dir / tag} is missing")


def save(engine: Any, ckpt_dir: Path, step: int, rows_consumed: int, args: argparse.Namespace) -> None:
    state = {"step": step, "rows_consumed": rows_consumed, **{key: getattr(args, key) for key in _MUST_MATCH}}
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"lemo_ds_train": state})


def load(engine: Any, ckpt_dir: Path, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Load the latest checkpoint into ``engine``; returns its step and data position."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    state = (client_state or {}).get("lemo_ds_train")
    if path is None or state is None:
        raise TrainingSetupError(f"--resume: {ckpt_dir} holds no checkpoint written by launch/train.py")
    changed = [
        f"{key} {state[key]!r} -> {getattr(args, key)!r}" for key in _MUST_MATCH if state.get(key) != getattr(args, key)
    ]
    if changed:
        log(f"warning: resuming with changed settings ({'; '.join(changed)}): the data order will not continue exactly")
    log(f"resumed from {Path(path).parent} at step {state['step']} ({state['rows_consumed']} rows consumed)")
    return state
