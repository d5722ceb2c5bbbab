"""Hidden-state norm scorer (an ablation): a block's score is the mean L2 norm of its tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lemo_ds.core.selection import num_blocks
from lemo_ds.scorers.base import BlockScorer, ScoreContext


class NormScorer(BlockScorer):
    name = "norm"

    def score(self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        block = context.block_size
        n = num_blocks(seq, block)
        accumulate = torch.promote_types(hidden_states.dtype, torch.float32)  # fp32 for bf16/fp16 inputs
        norms = torch.linalg.vector_norm(hidden_states, dim=-1, dtype=accumulate)  # [b, s]
        padded = F.pad(norms, (0, n * block - seq))  # [b, n * B]
        counts = torch.full((n,), float(block), device=norms.device)
        counts[-1] = seq - (n - 1) * block  # the tail block may be partial
        return padded.view(batch, n, block).sum(-1) / counts  # [b, n]
