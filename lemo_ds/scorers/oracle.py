"""Oracle scorer: true block informativeness from the layer's own queries and keys (LeMo's definition).

A thin adapter: the layer's policy makes the queries and keys (input norm, q/k projections, RoPE), and
``lemo_ds.kernels.oracle_scores`` scores them (the definition, the fused Triton kernel, its chunked torch path and
the torch reference all live there) under whichever allowed-pairs input the layer has: the model's 4D mask when its
attention takes one (eager attention: sliding windows, custom masks), else the row's document ids, else none
(plain causal).
"""

from __future__ import annotations

import torch
from torch import nn

from lemo_ds.kernels import oracle_scores
from lemo_ds.scorers.base import BlockScorer, ScoreContext


def oracle_block_scores(
    layer: nn.Module,
    hidden_states: torch.Tensor,  # [b, s, h], the layer input
    context: ScoreContext,
    backend: str = "auto",
    chunk_tokens: int = 512,
    return_tiles: bool = False,
):
    """The oracle's block scores [b, n] (and tiles [b, n, n] with ``return_tiles``) of ``hidden_states`` at ``layer``:
    the one adapter between a layer and the kernel, for the scorer and the predictors' labels, Hugging Face and
    Megatron layers alike (``context.policy.query_key_states`` makes the layer's own queries and keys)."""
    query, key = context.policy.query_key_states(layer, hidden_states, context.position_embeddings)
    # The mask when the model has one (it already holds documents and padding), else document ids or None.
    mask = context.attention_mask  # [b or 1, 1, s, s] or None
    allowed = mask if mask is not None else context.doc_ids()  # doc_ids [b, s] or None
    return oracle_scores(query, key, context.block_size, allowed, return_tiles=return_tiles, backend=backend,
                         chunk_tokens=chunk_tokens)  # fmt: skip


class OracleScorer(BlockScorer):
    """Scores a layer input with ``oracle_block_scores`` (see the module docstring)."""

    name = "oracle"

    def __init__(self, chunk_tokens: int, kernels: str = "auto") -> None:
        self.chunk_tokens = chunk_tokens
        self.kernels = kernels

    def score(self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext) -> torch.Tensor:
        return oracle_block_scores(layer, hidden_states, context, self.kernels, self.chunk_tokens)  # [b, n]
