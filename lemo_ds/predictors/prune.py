"""Elastic pruning: drop the ReLU units of a predictor that are almost never active (LeMo's elastic sizing).

A unit enters the block features only through its max and mean over the block's tokens; both are exactly 0 on a
block where the unit is 0 on every token. Activity is therefore counted per block: the share of blocks (over
held-out data) where the unit is positive on at least one token. Removing a unit active on no block leaves every
prediction on that data unchanged; ``min_activity`` (default 1% of blocks) trades a little of that for size.
"""

from __future__ import annotations

import torch

from lemo_ds.predictors.module import LayerPredictor, pool_blocks


class UnitActivity:
    """Counts, per unit of one predictor, the blocks where it is active."""

    def __init__(self, predictor: LayerPredictor) -> None:
        hidden_q, hidden_k = predictor.hidden_units
        device = predictor.w1q.device
        self.active_q = torch.zeros(hidden_q, dtype=torch.float64, device=device)
        self.active_k = torch.zeros(hidden_k, dtype=torch.float64, device=device)
        self.blocks = 0

    @torch.no_grad()
    def add(self, predictor: LayerPredictor, hidden_states: torch.Tensor, block_size: int) -> None:
        u, v = predictor.units(hidden_states)  # [b, s, r1q], [b, s, r1k]
        r1q, r1k = u.shape[-1], v.shape[-1]
        block_max_q = pool_blocks(u, block_size)[..., :r1q]  # [b, n, r1q]
        block_max_k = pool_blocks(v, block_size)[..., :r1k]
        self.active_q += (block_max_q > 0).flatten(0, 1).sum(0)
        self.active_k += (block_max_k > 0).flatten(0, 1).sum(0)
        self.blocks += block_max_q.shape[0] * block_max_q.shape[1]

    def shares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(share of blocks each q unit is active on [r1q], the same for k [r1k])."""
        total = max(self.blocks, 1)
        return self.active_q / total, self.active_k / total


def prune_predictor(predictor: LayerPredictor, activity: UnitActivity, min_activity: float = 0.01) -> LayerPredictor:
    """A smaller copy of ``predictor`` without the units active on fewer than ``min_activity`` of the blocks (at
    least one unit per side is kept: the most active one)."""
    share_q, share_k = activity.shares()
    keep_q = _kept(share_q, min_activity)
    keep_k = _kept(share_k, min_activity)
    pruned = LayerPredictor(predictor.hidden_size, predictor.design, len(keep_q), len(keep_k))
    r1q, r1k = predictor.hidden_units
    with torch.no_grad():
        pruned.w1q.copy_(predictor.w1q[keep_q])
        pruned.b1q.copy_(predictor.b1q[keep_q])
        pruned.w1k.copy_(predictor.w1k[keep_k])
        pruned.b1k.copy_(predictor.b1k[keep_k])
        pruned.wq.copy_(predictor.wq[:, torch.cat([keep_q, keep_q + r1q])])  # max- then mean-pooled columns
        pruned.wk.copy_(predictor.wk[:, torch.cat([keep_k, keep_k + r1k])])
        pruned.dist_bias.copy_(predictor.dist_bias)
    return pruned.to(predictor.w1q.device)


def _kept(share: torch.Tensor, min_activity: float) -> torch.Tensor:
    keep = torch.nonzero(share >= min_activity).flatten()
    return keep if keep.numel() else share.argmax().reshape(1)
