"""The ``"auto"`` values of the shipped DeepSpeed configs, filled where plain DeepSpeed runs them.

The configs in ds_configs/ leave the batch size, optimizer numbers, clipping and warm-up to ``"auto"``: the Hugging
Face Trainer fills those from its ``TrainingArguments`` and refuses a config whose numbers contradict them, so only
``"auto"`` lets ``TrainingArguments(..., deepspeed="ds_configs/zero3_lemo.json")`` work whatever its arguments are.
Plain DeepSpeed does not fill ``"auto"`` (a string batch size or learning rate fails deep inside it), so
launch/train.py and ``lemo_ds.initialize`` fill them here, with the values the configs held before they said
``"auto"``: the job's defaults. A number written in the config is kept.
"""

from __future__ import annotations

import copy
from typing import Any

AUTO = "auto"
DEFAULT_LR = 2e-4
# key path -> the value launch/train.py uses; the warm-up's rates follow the optimizer's (see fill_auto)
DEFAULTS: dict[tuple[str, ...], Any] = {
    ("train_micro_batch_size_per_gpu",): 1,
    ("gradient_accumulation_steps",): 1,
    ("gradient_clipping",): 1.0,
    ("optimizer", "params", "lr"): DEFAULT_LR,
    ("optimizer", "params", "betas"): [0.9, 0.95],
    ("optimizer", "params", "eps"): 1e-8,
    ("optimizer", "params", "weight_decay"): 0.0,
    ("scheduler", "params", "warmup_num_steps"): 5,
}
WARMUP_MIN_LR = 2e-5  # warmup_min_lr "auto": the configs' value, or the peak where that is lower


def fill_auto(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``ds_config`` with every ``"auto"`` among ``DEFAULTS`` replaced by its value; ``warmup_max_lr``
    ``"auto"`` becomes the optimizer's rate (as the Trainer fills it: the warm-up peaks at the learning rate) and
    ``warmup_min_lr`` ``"auto"`` 2e-5, or the peak where that is lower; ``train_batch_size`` ``"auto"`` is dropped
    (DeepSpeed derives it from the micro-batch, the accumulation and the world size). Keys the config does not have
    stay absent."""
    config = copy.deepcopy(ds_config)
    for path, value in DEFAULTS.items():
        parent = _parent(config, path)
        if parent is not None and parent.get(path[-1]) == AUTO:
            parent[path[-1]] = copy.deepcopy(value)
    if config.get("train_batch_size") == AUTO:
        del config["train_batch_size"]
    lr = _parent(config, ("optimizer", "params", "lr"))
    peak = lr["lr"] if lr is not None and isinstance(lr.get("lr"), int | float) else DEFAULT_LR
    scheduler = _parent(config, ("scheduler", "params", "warmup_max_lr"))
    if scheduler is not None:
        if scheduler.get("warmup_max_lr") == AUTO:
            scheduler["warmup_max_lr"] = peak
        if scheduler.get("warmup_min_lr") == AUTO:
            scheduler["warmup_min_lr"] = min(WARMUP_MIN_LR, peak)
    return config


def _parent(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The dict that holds ``path[-1]``, or None where the config has no such section."""
    node: Any = config
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None
