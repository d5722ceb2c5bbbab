"""The scorer interface: a block score per sample from a sparse layer's input.

A scorer returns ``[b, n_blocks]`` float scores (higher = keep), computed without gradients. It must be a
deterministic function of the layer input and its context (``lemo_ds.score_context``), so that recomputation
under activation checkpointing would reproduce it (the sparse core also keeps the selection for the recompute).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lemo_ds.score_context import ScoreContext

if TYPE_CHECKING:
    from lemo_ds.controller import LemoController

__all__ = ["BlockScorer", "ScoreContext"]  # ScoreContext lives in lemo_ds.score_context


class BlockScorer:
    """The base of every scorer: ``score`` ranks the blocks of a layer input; ``attach`` lets a scorer that learns
    (the predictor scorer) hook itself to the model's controller, once, when ``apply_lemo`` builds it."""

    name: str

    def score(self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext) -> torch.Tensor:
        """[b, n_blocks] float scores for ``hidden_states`` [b, s, h]."""
        raise NotImplementedError

    def attach(self, controller: LemoController) -> None:
        """Called once with the controller of the model this scorer serves; nothing to do by default."""
