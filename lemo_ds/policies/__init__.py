"""Injection policies per architecture family (import registers the built-in ones)."""

from lemo_ds.policies import llama as _llama  # noqa: F401  (registers Llama, Mistral, Qwen2, Qwen3)
from lemo_ds.policies.base import DecoderLayerPolicy
from lemo_ds.policies.registry import (
    check_supported,
    policy_for,
    register_policy,
    supported_model_types,
    unwrap_model,
)

__all__ = [
    "DecoderLayerPolicy",
    "check_supported",
    "policy_for",
    "register_policy",
    "supported_model_types",
    "unwrap_model",
]
