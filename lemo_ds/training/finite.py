"""Non-finite training state: a loss or weights that hold NaN/inf are never saved as a checkpoint.

One step at a too-high learning rate can turn the weights to inf while that step's loss (computed before the
update) is still finite, so the loss check alone is not enough: every save first checks the trainable
weights too (this rank's ZeRO-3 partition where there is one), agreed across ranks by one all-reduce.
"""

from __future__ import annotations

from typing import Any

import torch

from lemo_ds import distributed


def trainable_weights_finite(engine: Any) -> bool:
    """All ranks' trainable weights are finite (a collective: every rank calls it)."""
    bad = torch.zeros((), device=engine.device)
    for param in engine.module.parameters():
        if not param.requires_grad:
            continue  # frozen weights are as loaded; training does not change them
        data = getattr(param, "ds_tensor", None)  # ZeRO-3: this rank's partition (param.data is empty)
        data = param.data if data is None else data
        if data.numel() and not bool(torch.isfinite(data).all()):
            bad += 1
            break
    if distributed.initialized():
        torch.distributed.all_reduce(bad)
    return int(bad.item()) == 0
