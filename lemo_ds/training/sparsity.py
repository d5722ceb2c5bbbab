"""Whether the job's sequence length leaves the sparse layers anything to skip.

A sparse layer keeps ``max(min_blocks, always-kept blocks, round(keep_ratio * n_blocks))`` of its ``n_blocks``
blocks (lemo_ds.core.selection), the first block and a partial last block always among them. A row only a block
or two long keeps every block: the job would train fully dense while the config asks for token elimination.
That is allowed (a short smoke test), but it deserves one line of warning naming the length that would be sparse.
"""

from __future__ import annotations

from lemo_ds.config import LemoConfig
from lemo_ds.core.selection import forced_blocks, keep_block_count, num_blocks

_LONGEST_SEARCH = 1 << 16  # blocks; far beyond any sensible config


def skipped_blocks(lemo: LemoConfig, seq_len: int, ratio: float) -> tuple[int, int]:
    """(blocks per row, blocks a layer with keep ratio ``ratio`` keeps of them) for rows of ``seq_len`` tokens."""
    n = num_blocks(seq_len, lemo.block_size)
    forced = forced_blocks(seq_len, lemo.block_size, lemo.always_keep_blocks)
    return n, keep_block_count(n, ratio, lemo.min_blocks, len(forced))


def too_short_warning(lemo: LemoConfig, seq_len: int, num_layers: int, sp_size: int = 1) -> str | None:
    """The warning for a ``--seq-len`` at which no sparse layer skips a block, or None (some layer does, or the
    config has no sparse layer at all: a dense stack is dense on purpose). Under sequence parallelism each rank
    selects within its own shard of ``seq_len / sp_size`` tokens."""
    sparse = [ratio for ratio in lemo.layer_keep_ratios(num_layers) if ratio < 1.0]
    if not sparse:
        return None
    lowest = min(sparse)  # the layer that would skip the most
    n, kept = skipped_blocks(lemo, seq_len // sp_size, lowest)
    if kept < n:
        return None
    shortest = _shortest_sparse_length(lemo, lowest) * sp_size
    return (
        f"--seq-len {seq_len} is too short for token elimination: {n} block{'s' if n > 1 else ''} of "
        f"{lemo.block_size} tokens{' per sequence-parallel shard' if sp_size > 1 else ''}, and a sparse layer keeps "
        f"{kept} (keep_ratio {lowest:g}; the first and any partial last block are always kept), so this run trains "
        f"dense; use --seq-len {shortest} or more for lemo to skip blocks"
    )


def _shortest_sparse_length(lemo: LemoConfig, ratio: float) -> int:
    """The fewest tokens (whole blocks) at which a layer with keep ratio ``ratio`` skips a block."""
    for n in range(1, _LONGEST_SEARCH):
        if skipped_blocks(lemo, n * lemo.block_size, ratio)[1] < n:
            return n * lemo.block_size
    return _LONGEST_SEARCH * lemo.block_size
