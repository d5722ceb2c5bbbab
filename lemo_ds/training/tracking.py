"""Weights & Biases logging, when the DeepSpeed config's own monitor section asks for it.

``"wandb": {"enabled": true, "project": ..., "group": ..., "team": ...}`` makes DeepSpeed start a wandb run
on rank 0 inside ``deepspeed.initialize`` and log its own scalars there; the training job adds its metrics
(``lemo/*`` keys) to the same run. The run is offline unless the user set ``WANDB_MODE`` (no account or
network needed; ``wandb sync`` uploads it later), and it lives under OUTPUT_DIR unless ``WANDB_DIR`` is set.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from lemo_ds.training.errors import TrainingSetupError


def wandb_enabled(ds_config: dict[str, Any]) -> bool:
    section = ds_config.get("wandb")
    return isinstance(section, dict) and section.get("enabled") is True


def prepare_wandb(ds_config: dict[str, Any], output_dir: str) -> bool:
    """Check wandb is importable and set its environment, on every rank before deepspeed.initialize."""
    if not wandb_enabled(ds_config):
        return False
    if importlib.util.find_spec("wandb") is None:
        raise TrainingSetupError(
            'the DeepSpeed config enables "wandb" but the wandb package is not installed; '
            'pip install wandb, or set "wandb": {"enabled": false}'
        )
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", os.path.abspath(output_dir))
    return True


class WandbLogger:
    """Rank 0's handle on the wandb run (DeepSpeed's, or one started here if DeepSpeed started none)."""

    def __init__(self, ds_config: dict[str, Any], run_config: dict[str, Any]) -> None:
        import wandb

        section = ds_config["wandb"]
        self.wandb = wandb
        if wandb.run is None:
            wandb.init(
                project=section.get("project", "deepspeed"), group=section.get("group"), entity=section.get("team")
            )
        wandb.config.update({"lemo_ds": run_config}, allow_val_change=True)
        # DeepSpeed logs with step = samples seen; ours go on their own axis so neither drops the other's.
        wandb.define_metric("lemo/step")
        wandb.define_metric("lemo/*", step_metric="lemo/step")

    def log(self, record: dict[str, Any]) -> None:
        self.wandb.log({f"lemo/{k}": v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        self.wandb.finish()
