"""Tiny real Hugging Face models for the tests (random init from a config, no download)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 97
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str = "llama", layers: int = 4, attn: str = "sdpa", **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Llama-3
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    common.update(overrides)
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    if family == "qwen3":
        common.setdefault("head_dim", 8)
    config = config_class(**common)
    config._attn_implementation = attn
    return config


def tiny_model(
    family: str = "llama", layers: int = 4, attn: str = "sdpa", dtype=torch.float64, seed: int = 0, **overrides
):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, attn, **overrides), attn_implementation=attn)
    # Break the symmetry of the default init a little so attention has structure worth scoring.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    return model.to(dtype).train()


def packed_position_ids(batch: int, doc_lengths: list[int]) -> torch.Tensor:
    """Position ids restarting at 0 at every document: [b, sum(doc_lengths)]."""
    row = torch.cat([torch.arange(n) for n in doc_lengths])
    return row.expand(batch, -1).clone()
