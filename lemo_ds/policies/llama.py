"""Policies of the Llama-style families in transformers 5.x."""

from __future__ import annotations

import torch
from torch import nn

from lemo_ds.policies.base import DecoderLayerPolicy
from lemo_ds.policies.registry import register_policy


@register_policy
class LlamaPolicy(DecoderLayerPolicy):
    model_types = ("llama",)
    family = "Llama"


@register_policy
class MistralPolicy(DecoderLayerPolicy):
    model_types = ("mistral",)
    family = "Mistral"


@register_policy
class Qwen2Policy(DecoderLayerPolicy):
    # Qwen2's q/k projections carry a bias and some layers may use a sliding window; both live inside the
    # projections and the per-layer mask the model passes, so the Llama layout serves as it is.
    model_types = ("qwen2",)
    family = "Qwen2"


@register_policy
class Qwen3Policy(DecoderLayerPolicy):
    model_types = ("qwen3",)
    family = "Qwen3"

    def normalize_query_key(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Qwen3 applies an RMSNorm per head to queries and keys before RoPE.
        return attn.q_norm(query.transpose(1, 2)).transpose(1, 2), attn.k_norm(key.transpose(1, 2)).transpose(1, 2)
