"""The scorer interface: a block score per sample from a sparse layer's input.

A scorer returns ``[b, n_blocks]`` float scores (higher = keep), computed without gradients. It must be a
deterministic function of the layer input and the context below, so recomputation under activation
checkpointing would reproduce it (the sparse layer also caches the selection for the recompute).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from lemo_ds.documents import Documents
    from lemo_ds.policies.base import DecoderLayerPolicy


@dataclass
class ScoreContext:
    layer_index: int
    block_size: int
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin [b or 1, s, d]
    attention_mask: torch.Tensor | None  # the layer's 4D mask [b or 1, 1, s, s] (bool or additive) or None
    policy: DecoderLayerPolicy
    step: int  # optimizer step
    micro_step: int  # forward counter of the model
    rank: int
    # The row's documents (lemo_ds.documents) where the model attends by them rather than by a mask tensor.
    documents: Documents | None = None

    def doc_ids(self) -> torch.Tensor | None:
        """Document ids [b, s] for the oracle kernel when no mask tensor says it: None means plainly causal."""
        if self.attention_mask is not None or self.documents is None:
            return None
        return self.documents.doc_ids()

    def first_key_block(self) -> torch.Tensor | None:
        """[b, n] first key block per query block (the predictor's ``lo``) from the documents; None otherwise."""
        if self.attention_mask is not None or self.documents is None:
            return None
        return self.documents.first_key_block(self.block_size)


class BlockScorer(Protocol):
    name: str

    def score(self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext) -> torch.Tensor:
        """[b, n_blocks] float scores for ``hidden_states`` [b, s, h]."""
        ...
