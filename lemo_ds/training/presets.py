"""Model presets: Hugging Face configs built in code, trained from random init (never downloaded).

The ``tiny-*`` presets are small enough that a few steps at 1024 tokens take seconds on two CPU cores, and
deep enough (8 layers) that the deeper half gets sparse layers under the default "lemo" section. Their
vocabulary is the byte tokenizer's 259 ids rounded up to a multiple of 8. ``llama-2-7b`` and ``llama-3-8b``
have the real shapes (and real vocabulary sizes) of those models, for memory and speed benchmarks on GPUs;
the byte tokenizer uses only the first 259 ids of their vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

TINY_VOCAB = 264  # ByteTokenizer.vocab_size (259) rounded up to a multiple of 8

_TINY = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in Llama-3 / Mistral / Qwen2
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    tie_word_embeddings=False,
)


def _tiny_llama(**overrides) -> PretrainedConfig:
    return LlamaConfig(**{**_TINY, **overrides})


def _tiny_mistral(**overrides) -> PretrainedConfig:
    return MistralConfig(**{**_TINY, "sliding_window": None, **overrides})


def _tiny_qwen2(**overrides) -> PretrainedConfig:
    # Qwen2 ties the embeddings in its small sizes and has biases on the q/k/v projections.
    return Qwen2Config(**{**_TINY, "tie_word_embeddings": True, "use_sliding_window": False, **overrides})


_LLAMA_2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)

_LLAMA_3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    tie_word_embeddings=False,
)


def _llama_2_7b(**overrides) -> PretrainedConfig:
    return LlamaConfig(**{**_LLAMA_2_7B, **overrides})


def _llama_3_8b(**overrides) -> PretrainedConfig:
    return LlamaConfig(**{**_LLAMA_3_8B, **overrides})


PRESETS: dict[str, Callable[..., PretrainedConfig]] = {
    "tiny-llama": _tiny_llama,
    "tiny-mistral": _tiny_mistral,
    "tiny-qwen2": _tiny_qwen2,
    "llama-2-7b": _llama_2_7b,
    "llama-3-8b": _llama_3_8b,
}
DEFAULT_PRESET = "tiny-llama"


def preset_config(name: str, **overrides) -> PretrainedConfig:
    """A fresh config of preset ``name`` with ``overrides`` (e.g. ``num_hidden_layers=4``) applied at
    construction, so derived fields (such as Qwen2's per-layer ``layer_types``) follow them. KeyError if
    there is no such preset (see ``PRESETS``)."""
    return PRESETS[name](**overrides)
