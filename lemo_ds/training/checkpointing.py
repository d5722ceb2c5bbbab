"""Activation checkpointing (recomputation) of a Hugging Face model's decoder layers.

Apply it before ``lemo_ds.initialize``: the sparse layers keep the decoder layers' objects (only their class
changes), so the checkpointing flags and function set here stay in force, and the selection of kept
tokens, a function of the layer input only, is recomputed identically in backward.

Modes (``--grad-ckpt``):

- ``hf``: transformers' own, ``torch.utils.checkpoint`` non-reentrant.
- ``deepspeed``: ``deepspeed.checkpointing.checkpoint`` (reentrant), configured from the DeepSpeed config's
  "activation_checkpointing" section (``partition_activations``, ``cpu_checkpointing``, ...). transformers
  calls ``layer._gradient_checkpointing_func(partial(layer.__call__, **kwargs), hidden_states)`` for every
  ``GradientCheckpointingLayer``; ``PreTrainedModel._set_gradient_checkpointing`` installs that function, so
  it is given DeepSpeed's.
- ``auto``: ``deepspeed`` when the DeepSpeed config has an "activation_checkpointing" section, else ``off``.
- ``off``: nothing.

Reentrant checkpointing only builds a graph through a checkpointed layer if one of its tensor inputs needs
grad; with LoRA (frozen embeddings) nothing does, so the embeddings' output is made to require grad
(``enable_input_require_grads``) in both modes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lemo_ds.hf_compat import checkpointing_enable

MODES = ("auto", "hf", "deepspeed", "off")


def resolve_mode(mode: str, ds_config: dict[str, Any]) -> str:
    """``auto`` -> ``deepspeed`` if the config has an "activation_checkpointing" section, else ``off``."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "auto":
        return "deepspeed" if "activation_checkpointing" in ds_config else "off"
    return mode


def configure_activation_checkpointing(model: nn.Module, ds_config: dict[str, Any], mode: str = "auto") -> str:
    """Turn on checkpointing of every decoder layer of ``model`` (a Hugging Face ``PreTrainedModel``, before
    any peft wrapping) and return the mode that was applied (``auto`` resolved)."""
    mode = resolve_mode(mode, ds_config)
    if mode == "off":
        return mode
    if mode == "hf":
        checkpointing_enable(model, use_reentrant=False)
    else:
        import deepspeed

        # mpu None: no model parallelism, so partitioned activations (if asked for) split across nothing.
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
        if not model.supports_gradient_checkpointing:
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=deepspeed.checkpointing.checkpoint)
        model.enable_input_require_grads()  # gradient_checkpointing_enable does this itself in "hf" mode
    # Recomputation and a KV cache do not mix (transformers would warn and drop it on every call).
    model.config.use_cache = False
    return mode
