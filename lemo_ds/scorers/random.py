"""Random scorer: the random-LTD baseline (uniform random blocks, independent per layer and micro-batch)."""

from __future__ import annotations

import torch
from torch import nn

from lemo_ds.core.selection import num_blocks
from lemo_ds.scorers.base import BlockScorer, ScoreContext


class RandomScorer(BlockScorer):
    name = "random"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def score(self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        # A generator of its own, seeded from (seed, layer, micro-step, rank): the draw does not disturb or
        # depend on the global RNG, and every rank draws its own pattern for its own data.
        generator = torch.Generator(device="cpu")
        mixed = hash((self.seed, context.layer_index, context.micro_step, context.rank)) & 0x7FFF_FFFF_FFFF_FFFF
        generator.manual_seed(mixed)
        scores = torch.rand(batch, num_blocks(seq, context.block_size), generator=generator)  # [b, n]
        return scores.to(hidden_states.device)
