"""What the training job's flags change in the DeepSpeed config, and what it reads from it."""

from __future__ import annotations

import copy
import os
from typing import Any

from lemo_ds.training.errors import TrainingSetupError


def apply_flag_overrides(
    raw: dict[str, Any], *, lr: float | None, predictor: str | None, config_path: str, max_steps: int | None = None
) -> dict[str, Any]:
    """A copy of the config (with its "lemo" section) with ``--lr`` (the optimizer's rate and the warm-up
    peak), ``--predictor`` (lemo scorer "predictor" reading that file) and ``--max-steps`` (a scheduler's
    ``total_num_steps: "auto"``, as in the Hugging Face integration) applied."""
    raw = copy.deepcopy(raw)
    scheduler_params = (raw.get("scheduler") or {}).get("params", {})
    if lr is not None:
        if isinstance(raw.get("optimizer"), dict):
            raw["optimizer"].setdefault("params", {})["lr"] = lr
        if "warmup_max_lr" in scheduler_params:
            scheduler_params["warmup_max_lr"] = lr
    if scheduler_params.get("total_num_steps") == "auto":
        if max_steps is None:
            raise TrainingSetupError(
                f'{config_path}: scheduler.params.total_num_steps is "auto" but the job has no step count; '
                "pass --max-steps or write the number in the config"
            )
        scheduler_params["total_num_steps"] = max_steps
    if predictor is not None:
        if not isinstance(raw.get("lemo"), dict):
            raise TrainingSetupError(
                f'--predictor needs a "lemo" section in the DeepSpeed config ({config_path} has none); '
                "use ds_configs/zero3_lemo.json or add one"
            )
        if not os.path.isfile(predictor):
            raise TrainingSetupError(f"--predictor {predictor}: no such file; give a trained predictors file")
        raw["lemo"].update(scorer="predictor", predictor_path=os.path.abspath(predictor))
    return raw


def micro_batch_size(ds_config: dict[str, Any]) -> int:
    """train_micro_batch_size_per_gpu: the rows each rank packs into one micro-batch."""
    value = ds_config.get("train_micro_batch_size_per_gpu")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainingSetupError(
            "the DeepSpeed config must set train_micro_batch_size_per_gpu to a positive integer "
            f"(got {value!r}); the training job packs rows into micro-batches of that size"
        )
    return value


def require_optimizer(ds_config: dict[str, Any]) -> None:
    """The job lets DeepSpeed build the optimizer (and scheduler) from the config: it must name one."""
    if not isinstance(ds_config.get("optimizer"), dict):
        raise TrainingSetupError(
            'the DeepSpeed config has no "optimizer" section; add one, e.g. "optimizer": {"type": "AdamW", '
            '"params": {"lr": 2e-4, "torch_adam": true}} (see ds_configs/zero3_lemo.json)'
        )
