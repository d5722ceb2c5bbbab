"""What a sparse layer tells a scorer about its input (``ScoreContext``).

Its own module, below both users: the scorers (``lemo_ds.scorers``) score with it, and the predictors
(``lemo_ds.predictors``) compute their training labels from it, while the predictor scorer needs the predictors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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

