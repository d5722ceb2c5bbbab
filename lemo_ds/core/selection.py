"""Which blocks a sparse layer keeps: the selection rule of the contract, in one place.

For a sequence of ``s`` tokens split into ``n = ceil(s / B)`` blocks, a sparse layer with keep ratio ``r``
keeps ``k = max(min_blocks, round(r * n))`` blocks per sample: the forced blocks (the always-kept ones, and
the partial tail block when ``B`` does not divide ``s``, so that every sample keeps the same number of
tokens) plus the best-scored others, sorted ascending so causal order is preserved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def num_blocks(seq_len: int, block_size: int) -> int:
    return math.ceil(seq_len / block_size)


def forced_blocks(seq_len: int, block_size: int, always_keep: list[int]) -> list[int]:
    """Sorted block indices kept whatever their score. Indices past the sequence are ignored (a short
    sequence simply has no block 5); negative indices count from the end."""
    n = num_blocks(seq_len, block_size)
    forced = {i % n for i in always_keep if -n <= i < n}
    if seq_len % block_size:
        forced.add(n - 1)  # the partial tail block: keeps the kept-token count equal across the batch
    return sorted(forced)


def shard_forced_blocks(n_local: int, sp_size: int, sp_rank: int, always_keep: list[int]) -> tuple[list[int], int]:
    """Sequence parallelism: the always-kept blocks are GLOBAL block indices of the whole sequence of
    ``n_local * sp_size`` blocks; returns (the local indices of those in shard ``sp_rank``, sorted; the largest
    number of them in any one shard). Counting the largest number toward every rank's k keeps k equal on all
    ranks (equal all-to-all splits). Every shard is whole blocks, so there is no partial tail block."""
    n = n_local * sp_size
    forced = {i % n for i in always_keep if -n <= i < n}
    per_shard = [
        sorted(g - r * n_local for g in forced if r * n_local <= g < (r + 1) * n_local) for r in range(sp_size)
    ]
    return per_shard[sp_rank], max(len(blocks) for blocks in per_shard)


def keep_block_count(n_blocks: int, keep_ratio: float, min_blocks: int, n_forced: int) -> int:
    return min(n_blocks, max(min_blocks, n_forced, round(keep_ratio * n_blocks)))


def select_blocks(
    scores: torch.Tensor,  # [b, n] float, higher = more informative
    keep: int,
    forced: list[int],
) -> torch.Tensor:
    """Kept block indices [b, keep], int64, sorted ascending within each sample."""
    work = torch.nan_to_num(scores.float(), nan=-math.inf)  # [b, n]
    if forced:
        work[:, forced] = math.inf
    kept = work.topk(keep, dim=1, sorted=False).indices  # [b, keep]
    return kept.sort(dim=1).values


def stratified_priority(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Scores [b, n] -> priorities [b, n] that take each window of ``window`` blocks' best block first, then each
    window's second best, and so on (ties between windows by the raw score), so that a top-k of the priorities
    keeps about the same share of every window: the scorer chooses which blocks, not which part of the sequence.

    Why: column-sum scores grow with the number of queries a key block has (n - J under causal attention), so a
    global top-k keeps mostly early blocks, and the later positions of a long sequence, where context extension
    has to learn, would rarely pass through the sparse layers (measured in the accuracy benchmark)."""
    batch, n = scores.shape
    work = torch.nan_to_num(scores.float(), nan=-math.inf)  # [b, n]
    pad = (-n) % window
    grouped = F.pad(work, (0, pad), value=-math.inf).view(batch, -1, window)  # [b, n / w, w]
    rank = grouped.argsort(dim=2, descending=True, stable=True).argsort(dim=2)  # [b, n / w, w], 0 = best
    rank = rank.reshape(batch, -1)[:, :n].float()  # [b, n]
    tie = work.argsort(dim=1, descending=True, stable=True).argsort(dim=1).float() / n  # [b, n] in [0, 1)
    return -(rank + tie)


def token_index(block_index: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """Kept token rows [b, K] from kept blocks [b, k] (sorted). A partial tail block is always the last kept
    block, so its missing rows are exactly the last ``k * B - K`` entries, which are dropped."""
    offsets = torch.arange(block_size, device=block_index.device)  # [B]
    rows = (block_index[:, :, None] * block_size + offsets).flatten(1)  # [b, k * B]
    overhang = num_blocks(seq_len, block_size) * block_size - seq_len
    return rows[:, : rows.shape[1] - overhang] if overhang else rows
