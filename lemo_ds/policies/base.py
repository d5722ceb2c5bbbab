"""Injection policies: where a model family keeps what token elimination needs.

A policy knows, for one architecture family, where the decoder layers live, where the rotary embedding
lives, how a decoder layer receives its attention mask and RoPE cos/sin, and how to compute the layer's own
queries and keys (for the oracle scorer). Adding a family is one small subclass registered by model type
(see ``lemo_ds/policies/llama.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn


class DecoderLayerPolicy:
    """Policy of a Hugging Face decoder-only family laid out as ``model.model.layers`` (Llama-style).

    The decoder layer is called as ``layer(hidden_states, attention_mask=..., position_ids=...,
    position_embeddings=(cos, sin), ...)`` and returns the new hidden states.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    """Hugging Face ``config.model_type`` values this policy serves."""

    # ---- where things live ---------------------------------------------------------------------------

    def decoder_model(self, model: nn.Module) -> nn.Module:
        """The bare decoder (``LlamaModel``) inside a ``*ForCausalLM`` or the decoder itself."""
        return model.model if hasattr(model, "lm_head") else model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder_model(model).layers

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    # A decoder layer's sublayers, pre-norm: h + attention(input_norm(h)), then h + mlp(post_attention_norm(h)).

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def attention(self, layer: nn.Module) -> nn.Module:
        """Called as ``attention(hidden_states=..., position_embeddings=..., attention_mask=..., **kwargs)``; returns
        (output, weights)."""
        return layer.self_attn

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    # ---- the layer's call convention -----------------------------------------------------------------

    mask_kwarg: ClassVar[str] = "attention_mask"
    position_embeddings_kwarg: ClassVar[str] = "position_embeddings"
    position_ids_kwarg: ClassVar[str] = "position_ids"

    # ---- what the fused ops replace (lemo_ds.fused) ---------------------------------------------------

    family: ClassVar[str] = ""
    """Prefix of the modeling classes (``Llama``: LlamaRMSNorm, LlamaMLP, LlamaAttention), all written as Llama's:
    RMSNorm rounding to the input dtype before the weight, MLP ``down(act(gate(x)) * up(x))``, attention calling
    its modeling file's ``rope_function``. Empty: the family has no fused ops."""

    rope_function: ClassVar[str] = "apply_rotary_pos_emb"

    def fusable_modules(self, model: nn.Module) -> Iterator[tuple[nn.Module, type]]:
        """(module, fused mixin) for every RMSNorm, SwiGLU MLP and attention of the decoder that the fused ops
        replace; an MLP whose activation is not SiLU is left out."""
        from lemo_ds.class_swap import root_class
        from lemo_ds.fused import FusedRMSNormMixin, FusedRoPEAttentionMixin, FusedSwiGLUMixin

        if not self.family:
            return
        kinds = {f"{self.family}RMSNorm": FusedRMSNormMixin, f"{self.family}MLP": FusedSwiGLUMixin,
                 f"{self.family}Attention": FusedRoPEAttentionMixin}  # fmt: skip
        silu = getattr(getattr(model, "config", None), "hidden_act", None) in ("silu", "swish")
        for module in self.decoder_model(model).modules():
            mixin = kinds.get(root_class(module).__name__)
            if mixin is not None and (mixin is not FusedSwiGLUMixin or silu):
                yield module, mixin

    # ---- what the oracle scorer needs ------------------------------------------------------------------

    def head_counts(self, layer: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim) of a decoder layer."""
        attn = self.attention(layer)
        config = attn.config
        head_dim = attn.head_dim
        return config.num_attention_heads, config.num_key_value_heads, head_dim

    def query_key_states(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,  # [b, s, h] layer input
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin [b or 1, s, d]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's queries [b, H, s, d] and keys [b, KV, s, d] after RoPE, as its attention computes them."""
        attn = self.attention(layer)
        normed = self.input_norm(layer)(hidden_states)  # [b, s, h]
        batch, seq = normed.shape[:2]
        num_heads, num_kv, head_dim = self.head_counts(layer)
        query = attn.q_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)  # [b, H, s, d]
        key = attn.k_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)  # [b, KV, s, d]
        query, key = self.normalize_query_key(attn, query, key)
        cos, sin = position_embeddings
        return _apply_rope(query, cos, sin), _apply_rope(key, cos, sin)

    def normalize_query_key(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head normalisation some families apply before RoPE (Qwen3's q_norm/k_norm); none here."""
        return query, key


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [b, heads, s, d]; cos/sin [b or 1, s, d]: the half-rotation convention of Llama, Mistral and Qwen.
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
