"""The policy registry, keyed by Hugging Face ``config.model_type``."""

from __future__ import annotations

from torch import nn

from lemo_ds.errors import UnsupportedModelError
from lemo_ds.policies.base import DecoderLayerPolicy

_POLICIES: dict[str, type[DecoderLayerPolicy]] = {}


def register_policy(policy: type[DecoderLayerPolicy]) -> type[DecoderLayerPolicy]:
    """Class decorator: serve every model type the policy names."""
    if not policy.model_types:
        raise ValueError(f"{policy.__name__} names no model_types")
    for model_type in policy.model_types:
        _POLICIES[model_type] = policy
    return policy


def supported_model_types() -> list[str]:
    return sorted(_POLICIES)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DeepSpeed engine or a peft wrapper."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DeepSpeedEngine, DDP
            model = model.module
        else:
            break
    return model


def model_type_of(model_or_config) -> str | None:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None)


def check_supported(model_type: str | None) -> None:
    if model_type not in _POLICIES:
        raise UnsupportedModelError(
            f"lemo_ds has no injection policy for model type {model_type!r}; supported model types: "
            f"{', '.join(supported_model_types())}. Add a DecoderLayerPolicy subclass with "
            '@register_policy (see lemo_ds/policies/llama.py), or drop the "lemo" section to train dense.'
        )


def policy_for(model: nn.Module) -> DecoderLayerPolicy:
    """The policy serving a (possibly wrapped) Hugging Face model; a clear error when there is none."""
    model_type = model_type_of(unwrap_model(model))
    check_supported(model_type)
    return _POLICIES[model_type]()
