"""One sparse layer's plan: which blocks it keeps, and the bookkeeping around running it on them.

The sparse step (``lemo_ds.core.step``) drives it, for the Hugging Face layer (``lemo_ds.decoder_layer``) and the
Megatron-core layer (``lemo_ds.megatron.layer``) alike. Everything that decides or counts tokens is here, once:

1. ``keep_ratio``: the schedule's ratio for this layer now (1.0: run dense);
2. ``check_length``: a row too short for one block, or a sequence-parallel shard that is not whole blocks;
3. ``recalled``: under activation checkpointing, the recompute takes the forward's selection back
   (``lemo_ds.core.recompute``) instead of choosing again;
4. ``choose``: scores -> stratified windows -> nesting under the previous sparse layer -> forced blocks (the
   always-kept ones, per shard under sequence parallelism) and top-k; ``remember`` keeps it for the recompute;
5. ``account``: the measured keep ratio and the rows this forward processed (for the loss and nesting);
6. ``writes_in_place``: whether the write-back may overwrite the layer input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lemo_ds.core.recompute import SelectionCache
from lemo_ds.core.selection import (
    forced_blocks,
    keep_block_count,
    num_blocks,
    select_blocks,
    shard_forced_blocks,
    stratified_priority,
)
from lemo_ds.errors import LemoInputError

if TYPE_CHECKING:
    from lemo_ds.config import LemoConfig
    from lemo_ds.controller import LemoController
    from lemo_ds.scorers.base import BlockScorer
    from lemo_ds.sequence_parallel import SequenceParallel


def in_backward() -> bool:
    """True inside the autograd engine's backward pass, where a checkpoint's recompute runs."""
    return torch._C._current_graph_task_id() != -1


@dataclass(eq=False)
class SparsePlan:
    layer_index: int  # global, 0-based
    controller: LemoController  # shared by every layer of the model
    scorer: BlockScorer | None  # None: the layer computes the oracle from its own queries and keys (Megatron)
    cache: SelectionCache = field(default_factory=SelectionCache)

    @property
    def config(self) -> LemoConfig:
        return self.controller.config

    def keep_ratio(self, training: bool) -> float:
        return self.controller.keep_ratio(self.layer_index, training)

    def check_length(self, seq: int, sp: SequenceParallel | None = None) -> None:
        block = self.config.block_size
        if seq < block:
            raise LemoInputError(
                f"sequence of {seq} tokens is shorter than one lemo block ({block} tokens); use sequences of at "
                f"least {block} tokens or a smaller lemo.block_size"
            )
        if sp is not None and seq % block:
            raise LemoInputError(
                f"under sequence parallelism each rank's shard must be whole lemo blocks: this shard has {seq} "
                f"tokens, block_size is {block}; use a sequence length that is a multiple of {sp.size} x {block}"
            )

    def recalled(self, checkpointed: bool, key: object | None = None) -> torch.Tensor | None:
        """The forward's kept blocks [b, k] when this call is a checkpoint's recompute, else None.

        ``checkpointed``: the call runs under an activation checkpoint that will call it again in backward; the
        recompute takes the forward's selection back by ``key`` when given, else the oldest of this step."""
        if checkpointed and in_backward():
            return self.cache.take(self.controller.step, key)
        return None

    def choose(self, scores: torch.Tensor, seq: int, ratio: float,
               sp: SequenceParallel | None = None) -> torch.Tensor:  # fmt: skip
        """Kept block indices [b, k], ascending, from the layer input's block scores [b, n].

        ``sp``: this rank's sequence-parallel shard (forced blocks are global block indices; every rank keeps the
        same number of blocks)."""
        config = self.config
        n = num_blocks(seq, config.block_size)
        if sp is None:
            forced = forced_blocks(seq, config.block_size, config.always_keep_blocks)
            keep = keep_block_count(n, ratio, config.min_blocks, len(forced))
        else:
            forced, most_forced = shard_forced_blocks(n, sp.size, sp.rank, config.always_keep_blocks)
            keep = keep_block_count(n, ratio, config.min_blocks, most_forced)  # equal on every SP rank
        with torch.no_grad():
            if config.selection_window:
                scores = stratified_priority(scores, config.selection_window)  # [b, n]
            earlier = self.controller.last_kept_blocks  # [b, k'] kept by the previous sparse layer of this forward
            if config.nested_selection and earlier is not None and earlier.shape[0] == scores.shape[0]:
                # Blocks eliminated earlier rank below every block still in play (kept blocks first).
                allowed = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, earlier, True)  # [b, n]
                scores = torch.where(allowed, scores.float(), torch.finfo(torch.float32).min)
            return select_blocks(scores, keep, forced)  # [b, k]

    def remember(self, blocks: torch.Tensor, checkpointed: bool, key: object | None = None) -> None:
        """Keep a checkpointed forward's selection for its recompute (see ``recalled``)."""
        if checkpointed and not in_backward():
            self.cache.put(self.controller.step, blocks, key)

    def account(self, blocks: torch.Tensor, rows: torch.Tensor, seq: int, training: bool) -> None:
        """Count a sparse call that kept ``blocks`` [b, k] = ``rows`` [b, K] of ``seq`` (training forwards only: a
        checkpoint's recompute is not a second pass of data)."""
        if training and not in_backward():
            self.controller.record(self.layer_index, rows.shape[1], seq)
            self.controller.note_selection(blocks, rows, seq)

    def account_dense(self, seq: int, training: bool) -> None:
        """Count a call that ran dense (a dense phase of the schedule)."""
        if training and not in_backward():
            self.controller.record(self.layer_index, seq, seq)

    def writes_in_place(self) -> bool:
        """The write-back may overwrite the layer input: asked for, and the caller does not keep every layer's output
        (output_hidden_states). The layouts add their own conditions (a checkpoint that stores the input)."""
        return self.config.inplace_writeback and not self.controller.keeps_layer_outputs
