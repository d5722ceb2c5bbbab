"""Top-k recall of a predictor against the oracle, with the selection rule of the contract.

For a layer keeping ``k = keep_block_count(n, ratio, min_blocks, |forced|)`` blocks, both sides keep the forced
blocks (the always-kept ones and a partial tail) and choose the other ``k - |forced|`` by score. Recall counts
only those chosen blocks: |predicted choice & oracle choice| / (k - |forced|). Forced blocks are left out on both
sides because they match by construction and would flatter the figure (at n = 16 and k = 6, the sink block
alone would add 1/6). A sample with nothing to choose has recall 1.
"""

from __future__ import annotations

import math

import torch

from lemo_ds.core.selection import forced_blocks, keep_block_count, num_blocks, stratified_priority


def free_choice(n: int, seq: int, block_size: int, keep_ratio: float, min_blocks: int, always_keep: list[int]):
    """(forced block indices, number of blocks chosen by score) for a layer with ``keep_ratio``."""
    forced = forced_blocks(seq, block_size, always_keep)
    return forced, keep_block_count(n, keep_ratio, min_blocks, len(forced)) - len(forced)


def chosen_mask(scores: torch.Tensor, choose: int, forced: list[int]) -> torch.Tensor:
    """[b, n] bool: the ``choose`` best-scored blocks among the non-forced ones."""
    work = torch.nan_to_num(scores.detach().float(), nan=-math.inf)  # [b, n]
    if forced:
        work[:, forced] = -math.inf
    mask = torch.zeros_like(work, dtype=torch.bool)
    if choose > 0:
        mask.scatter_(1, work.topk(choose, dim=1).indices, True)
    return mask


def topk_recall(
    predicted: torch.Tensor,  # [b, n] predicted block scores
    oracle: torch.Tensor,  # [b, n] oracle block scores
    seq: int,
    block_size: int,
    keep_ratio: float,
    min_blocks: int = 1,
    always_keep: list[int] | tuple[int, ...] = (0,),
    window: int = 0,
) -> torch.Tensor:
    """Recall per sample [b] (float32), as the module docstring defines it; ``window``: the layer's stratified
    selection (lemo ``selection_window``), applied to both sides."""
    n = num_blocks(seq, block_size)
    if window:
        predicted, oracle = stratified_priority(predicted, window), stratified_priority(oracle, window)
    forced, choose = free_choice(n, seq, block_size, keep_ratio, min_blocks, list(always_keep))
    if choose <= 0:
        return torch.ones(predicted.shape[0])
    both = chosen_mask(predicted, choose, forced) & chosen_mask(oracle, choose, forced)  # [b, n]
    return both.sum(1).float().cpu() / choose
