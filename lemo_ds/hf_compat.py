"""What lemo_ds reads from transformers that changed between the releases it supports, in one place.

Each entry names the releases on each side; tests/test_hf_compat.py checks every entry against the installed
transformers, and CI runs the suite on the oldest supported and on the newest release (``.ci/run``).
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

# The KV cache's keyword in a decoder layer's and a decoder's call: ``past_key_values`` up to transformers 5.2x,
# ``cache`` since 5.24 (which still accepts the old name with a deprecation warning).
CACHE_KWARGS = ("cache", "past_key_values")

# The cache's field in model outputs, under the same rename.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed in a call's keyword arguments under either name, or None."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def causal_lm_output(loss: Any, decoder_outputs: Any) -> CausalLMOutputWithPast:
    """A causal LM's output with ``loss``, no logits, and the decoder's cache, hidden states and attentions."""
    # The old name only where the output has no "cache" field: 5.24 logs a deprecation for every read of the old one.
    name = "cache" if "cache" in getattr(decoder_outputs, "__dataclass_fields__", ()) else "past_key_values"
    cache = getattr(decoder_outputs, name, None)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=decoder_outputs.hidden_states,
                                  attentions=decoder_outputs.attentions, **{_OUTPUT_CACHE_FIELD: cache})  # fmt: skip


def checkpointing_enable(model: Any, **checkpoint_kwargs: Any) -> None:
    """Hugging Face activation checkpointing on, with ``checkpoint_kwargs`` for torch's checkpoint:
    ``activation_checkpointing_enable`` since transformers 5.24, which deprecates ``gradient_checkpointing_enable``
    (a FutureWarning), the only name before it."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def checkpointing_disable(model: Any) -> None:
    """Hugging Face activation checkpointing off, under the same rename."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


def trainer_checkpointing_arguments(**checkpoint_kwargs: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords that turn on the Trainer's activation checkpointing with ``checkpoint_kwargs``:
    ``activation_checkpointing[_kwargs]`` since transformers 5.24, which deprecates ``gradient_checkpointing[_kwargs]``
    (a FutureWarning), the only names before it."""
    from transformers import TrainingArguments

    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": checkpoint_kwargs}
