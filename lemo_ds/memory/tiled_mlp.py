"""Tiled MLP: a decoder layer's MLP run in tiles along the sequence (DeepSpeed's TiledMLP).

The MLP is token-wise, so its [b, s, intermediate] activations need not exist whole: DeepSpeed's ``TiledMLP``
runs the tiles under no_grad in forward and recomputes each tile with autograd in backward, storing only the
MLP input. At long context those activations (gate, up, their product: 3 x s x intermediate) are what sets the
peak of a dense layer's recompute under activation checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

from lemo_ds import distributed


def _agreed_shards(shards: int, device: torch.device) -> int:
    # Under ZeRO-3 every tile gathers the MLP's weights: every rank must run the same number of tiles.
    if distributed.world_size() > 1:
        backend = torch.distributed.get_backend()
        count = torch.tensor([shards], device=device if backend != "gloo" else "cpu")
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item())
    return shards


@dataclass(frozen=True)
class MLPPlan:
    tile_tokens: int  # tokens per tile


class TiledMLPMixin:
    """Placed before the model's MLP class; ``_lemo`` (an ``MLPPlan``) is set by apply_lemo."""

    _lemo: MLPPlan

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [b, s, h]
        shards = _agreed_shards(math.ceil(x.shape[-2] / self._lemo.tile_tokens), x.device)
        if shards <= 1:
            return _untiled_forward(self, x)
        if not torch.is_grad_enabled():  # e.g. the first pass of a reentrant checkpoint: tiles, nothing to store
            return torch.cat([_untiled_forward(self, tile) for tile in torch.chunk(x, shards, dim=-2)], dim=-2)
        trainable = [p for p in self.parameters() if p.requires_grad]
        return TiledMLP.apply(_untiled_forward, self, x, shards, trainable)


def _untiled_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own MLP on ``x`` [b, t, h] (TiledMLP calls it with the module)."""
    return super(TiledMLPMixin, module).forward(x)
