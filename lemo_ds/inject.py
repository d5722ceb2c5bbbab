"""``apply_lemo``: convert a Hugging Face model's deeper decoder layers into sparse layers, in place.

The policy of the model's family (``lemo_ds.policies``) locates the decoder layers; each layer whose keep
ratio is below 1.0 gets its class swapped for the sparse subclass (``lemo_ds.sparse_layer``). DeepSpeed's
``module_inject.replace_module`` traversal was considered and not used: it is the inference-injection path
(it replaces modules by class with new instances and attaches ``reset_cache`` to every module it walks),
while a policy that names the layer list directly needs no traversal and keeps every module object, so
ZeRO-3 partitions, peft adapters and registered hooks stay as they were.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lemo_ds.class_swap import swap_in, swap_out
from lemo_ds.config import LemoConfig, parse_lemo_config, split_ds_config
from lemo_ds.controller import LemoController
from lemo_ds.document_attention import ATTENTION, add_documents
from lemo_ds.errors import LemoConfigError
from lemo_ds.memory.causal_lm import SegmentLossCausalLMMixin
from lemo_ds.memory.compact import RecordedNormMixin, is_rms_norm
from lemo_ds.memory.ds_checkpointing import fix_deepspeed_cpu_checkpointing
from lemo_ds.memory.layer import MemoryLayerMixin, MemoryLayerState
from lemo_ds.memory.offload import CheckpointOffloader
from lemo_ds.memory.tiled_mlp import TiledMLPMixin
from lemo_ds.policies import policy_for, unwrap_model
from lemo_ds.scorers import build_scorer
from lemo_ds.sequence_parallel import active as sequence_parallel
from lemo_ds.sparse_layer import SparseDecoderLayerMixin, SparseLayerState

SUPPORTED_ATTENTION = ("sdpa", "eager")

_CONTROLLER_ATTR = "_lemo_controller"
_HOOK_ATTR = "_lemo_forward_hook"
_MIXINS = (SparseDecoderLayerMixin, MemoryLayerMixin, RecordedNormMixin, TiledMLPMixin, SegmentLossCausalLMMixin)
_ATTRIBUTES = ("_lemo", "_lemo_tile_tokens", "_lemo_memory", "_lemo_policy", "_lemo_memory_layer", "_lemo_offloader")


def _as_lemo_config(config: LemoConfig | dict[str, Any] | str | os.PathLike | None) -> LemoConfig | None:
    """A LemoConfig from a LemoConfig, a "lemo" section dict, a whole DeepSpeed config dict (with a "lemo"
    key) or the path of a DeepSpeed config file."""
    if isinstance(config, (str, os.PathLike)):
        return split_ds_config(config)[0]
    if isinstance(config, dict) and "lemo" in config:
        return parse_lemo_config(config["lemo"])
    return parse_lemo_config(config)


def get_controller(model: nn.Module) -> LemoController | None:
    """The controller of a model converted by apply_lemo (through any peft or DeepSpeed wrapper), else None."""
    return getattr(unwrap_model(model), _CONTROLLER_ATTR, None)


def apply_lemo(model: nn.Module, config: LemoConfig | dict[str, Any] | str | os.PathLike | None) -> nn.Module:
    """Convert ``model``'s sparse layers in place and return the model.

    ``model``: a Hugging Face causal LM (possibly peft-wrapped, possibly built under deepspeed.zero.Init).
    ``config``: the "lemo" section (dict or LemoConfig), a DeepSpeed config dict holding one, or a config file.
    A missing section or ``"enabled": false`` leaves the model as it is.
    """
    lemo_config = _as_lemo_config(config)
    if lemo_config is None or not lemo_config.enabled:
        return model
    base = unwrap_model(model)
    if get_controller(base) is not None:
        raise LemoConfigError("apply_lemo: this model is already converted; call lemo_ds.remove_lemo(model) first")
    policy = policy_for(base)
    attention = getattr(base.config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION and attention != ATTENTION:  # ATTENTION: enable_document_attention's
        raise LemoConfigError(
            f"lemo_ds supports attn_implementation {' or '.join(repr(a) for a in SUPPORTED_ATTENTION)}; the model "
            f'uses {attention!r}. Load it with attn_implementation="sdpa".'
        )
    layers = policy.decoder_layers(base)
    ratios = lemo_config.layer_keep_ratios(len(layers))
    controller = LemoController(lemo_config, ratios)
    scorer = build_scorer(lemo_config)
    scorer.attach(controller)
    memory = lemo_config.memory
    fix_deepspeed_cpu_checkpointing()  # DeepSpeed's synchronous CPU checkpointing, see memory/ds_checkpointing.py
    offloader = CheckpointOffloader(generation=lambda: controller.micro_step) if memory.offload_checkpoints else None
    for index, (layer, ratio) in enumerate(zip(layers, ratios, strict=True)):
        if memory.compact_saves or offloader is not None:
            swap_in(layer, MemoryLayerMixin)._lemo_memory_layer = MemoryLayerState(memory.compact_saves, offloader)
        if memory.compact_saves:
            for child in layer.children():
                if is_rms_norm(child):
                    swap_in(child, RecordedNormMixin)
        if ratio < 1.0:
            swap_in(layer, SparseDecoderLayerMixin)._lemo = SparseLayerState(index, controller, policy, scorer)
        if lemo_config.memory.tiled_mlp:
            swap_in(policy.mlp(layer), TiledMLPMixin)._lemo_tile_tokens = lemo_config.memory.tiled_mlp_tokens
    if lemo_config.memory.segment_loss:
        final_norm = getattr(policy.decoder_model(base), "norm", None)
        if memory.compact_saves and final_norm is not None and is_rms_norm(final_norm):
            swap_in(final_norm, RecordedNormMixin)
        swap_in(base, SegmentLossCausalLMMixin)
        base._lemo_memory, base._lemo_policy = lemo_config.memory, policy
    if "_lemo_attention" not in base.__dict__:
        # Turned on here, so remove_lemo turns it off; a model that had it before keeps it.
        base._lemo_owns_attention = enable_document_attention(base)
    # A KV cache needs every token of every layer: training forwards must not build one. Generation still
    # does (generation_config.use_cache), and runs dense because evaluation is dense by default.
    base.config.use_cache = False
    base._lemo_offloader = offloader
    setattr(base, _CONTROLLER_ATTR, controller)
    setattr(base, _HOOK_ATTR, base.register_forward_pre_hook(_count_forward, with_kwargs=True))
    return model


def remove_lemo(model: nn.Module) -> nn.Module:
    """Undo apply_lemo: every layer gets its original class back; the model is the plain model again."""
    base = unwrap_model(model)
    if get_controller(base) is None:
        return model
    if base.__dict__.pop("_lemo_owns_attention", False):
        disable_document_attention(base)
    for module in base.modules():
        while isinstance(module, _MIXINS):  # a sparse layer carries two mixins (sparse, memory)
            swap_out(module)
        for attribute in _ATTRIBUTES:
            if attribute in module.__dict__:
                delattr(module, attribute)
    getattr(base, _HOOK_ATTR).remove()
    delattr(base, _HOOK_ATTR)
    delattr(base, _CONTROLLER_ATTR)
    return model


def enable_document_attention(model: nn.Module) -> bool:
    """Packed documents and padding without [s, s] masks (``lemo_ds.document_attention``) for an sdpa model, in
    place; ``apply_lemo`` calls it, and a dense model can have it alone (launch/train.py does, so that its dense
    job attends like its lemo job). True where it is on. It does not apply, and the model is left as it is, to
    eager attention (Hugging Face's own masks) and under Ulysses sequence parallelism (DeepSpeed's wrapper owns
    "sdpa" there and ``lemo_ds.sequence_parallel`` keeps documents apart)."""
    base = unwrap_model(model)
    if "_lemo_attention" in base.__dict__:
        return True
    attention = getattr(base.config, "_attn_implementation", None)
    if attention != "sdpa" or sequence_parallel() is not None:
        return False
    base._lemo_attention = attention
    base.config._attn_implementation = ATTENTION
    decoder = policy_for(base).decoder_model(base)
    base._lemo_documents_hook = decoder.register_forward_pre_hook(add_documents, with_kwargs=True)
    return True


def disable_document_attention(model: nn.Module) -> None:
    """Undo ``enable_document_attention``: the model's own attention and masks again."""
    base = unwrap_model(model)
    if "_lemo_attention" in base.__dict__:
        base.config._attn_implementation = base._lemo_attention
        base._lemo_documents_hook.remove()
        del base._lemo_attention, base._lemo_documents_hook


def _count_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    controller: LemoController = getattr(module, _CONTROLLER_ATTR)
    # output_hidden_states (the call's, else the config's) makes the model keep a reference to every layer's
    # output, which a later sparse layer's in-place write-back would change.
    wants_hidden_states = kwargs.get("output_hidden_states")
    if wants_hidden_states is None:
        wants_hidden_states = getattr(module.config, "output_hidden_states", False)
    controller.on_model_forward(keeps_layer_outputs=bool(wants_hidden_states), training=module.training)
    if module.training:
        tokens = _tokens_in(args, kwargs)
        if tokens:
            controller.record_dense(tokens)


def _tokens_in(args: tuple, kwargs: dict) -> int:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None:
        return input_ids.shape[-1]
    embeds = kwargs.get("inputs_embeds")
    return embeds.shape[1] if embeds is not None else 0
