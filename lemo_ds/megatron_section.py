"""What a Megatron-core model honours of a "lemo" section (no Megatron import: launch/train_megatron.py checks a
section with it before it imports megatron.core, which takes seconds)."""

from __future__ import annotations

from lemo_ds.config import LEMO_ARTIFACT_RULE, LemoConfig
from lemo_ds.errors import LemoConfigError

# Keys of the "lemo" section that only the Hugging Face path implements, and why the Megatron path cannot.
_OWN_LOSS = "the loss is the Megatron model's own (lemo_ds's segment loss is a Hugging Face causal LM's)"
_HF_ONLY_KEYS = {
    "loss_tokens": _OWN_LOSS,
    "skipped_loss_weight": _OWN_LOSS,
    "memory": "the memory stack converts Hugging Face modules; use Megatron's own recompute and offload settings",
    "fused_ops": "the fused ops replace Hugging Face modules; Megatron-core has its own fused kernels "
    "(Transformer Engine's RMSNorm, RoPE and SwiGLU)",
}


def with_megatron_defaults(lemo: LemoConfig) -> LemoConfig:
    """The section with LeMo's own rule (``LEMO_ARTIFACT_RULE``) for the keys it leaves out: the recommended defaults
    rest on lemo_ds's loss over the processed positions and on predictors trained on Hugging Face layers, neither of
    which a Megatron model has."""
    return lemo.model_copy(update={k: v for k, v in LEMO_ARTIFACT_RULE.items() if k not in lemo.model_fields_set})


def refuse_unhonoured_keys(lemo: LemoConfig) -> None:
    """A key the user set in the "lemo" section that the Megatron path cannot honour is an error, not a no-op
    (``loss_tokens: "all"`` is what Megatron's own loss does, and passes)."""
    honoured = {key for key, value in LEMO_ARTIFACT_RULE.items() if getattr(lemo, key) == value}
    for key in sorted((lemo.model_fields_set & _HF_ONLY_KEYS.keys()) - honoured):
        raise LemoConfigError(
            f"lemo.{key} is not available for Megatron-core layers: {_HF_ONLY_KEYS[key]}. Remove it from the "
            '"lemo" section.'
        )
