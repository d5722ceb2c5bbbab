"""``apply_lemo``: convert a Hugging Face model in place: one converted class per module kind, each with one plan.

The policy of the model's family (``lemo_ds.policies``) locates the modules. Each converted module keeps its object
and gets its class swapped for ``<Mixin><Name>`` (``lemo_ds.class_swap.mixed_class``: ``LemoCausalLMLlamaForCausalLM``,
``LemoDecoderLayerLlamaDecoderLayer``, ...) and one plan in ``_lemo``:

- the causal LM: ``LemoCausalLMMixin`` / ``ModelPlan`` (lemo_ds/causal_lm.py): counts forwards, segment loss;
- each decoder layer with something to do: ``LemoDecoderLayerMixin`` / ``LayerPlan`` (lemo_ds/decoder_layer.py):
  the memory context around the layer, and token elimination where its keep ratio is below 1.0;
- each MLP with the tiled MLP on: ``TiledMLPMixin`` / ``MLPPlan`` (lemo_ds/memory/tiled_mlp.py);
- each RMSNorm under compaction: ``RecordedNormMixin`` (lemo_ds/memory/compact.py), no state;
- each RMSNorm, SwiGLU MLP and attention with the fused ops on: ``Fused*Mixin`` (lemo_ds/fused.py), converted first,
  so that the memory features above wrap the fused forward.

``remove_lemo`` swaps every class back and deletes ``_lemo``. DeepSpeed's ``module_inject.replace_module``
traversal was considered and not used: it is the inference-injection path (it replaces modules by class with new
instances and attaches ``reset_cache`` to every module it walks), while a policy that names the layer list directly
needs no traversal and keeps every module object, so ZeRO-3 partitions, peft adapters and registered hooks stay as
they were.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lemo_ds.causal_lm import LemoCausalLMMixin, ModelPlan
from lemo_ds.class_swap import swap_in, swap_out
from lemo_ds.config import LemoConfig, parse_lemo_config, split_ds_config
from lemo_ds.controller import LemoController
from lemo_ds.core.plan import SparsePlan
from lemo_ds.decoder_layer import LayerPlan, LemoDecoderLayerMixin
from lemo_ds.document_attention import ATTENTION, add_documents
from lemo_ds.errors import LemoConfigError
from lemo_ds.fused import apply_fused_ops, forget_fused_state, fused_mixins
from lemo_ds.memory.compact import RecordedNormMixin, is_rms_norm
from lemo_ds.memory.ds_checkpointing import fix_deepspeed_cpu_checkpointing
from lemo_ds.memory.layer import LayerMemory
from lemo_ds.memory.offload import CheckpointOffloader
from lemo_ds.memory.tiled_mlp import MLPPlan, TiledMLPMixin
from lemo_ds.policies import policy_for, unwrap_model
from lemo_ds.scorers import BlockScorer, build_scorer
from lemo_ds.sequence_parallel import active as sequence_parallel
from lemo_ds.zero_fetch import skip_needless_fetch_syncs

SUPPORTED_ATTENTION = ("sdpa", "eager")

_CONVERTED = (LemoCausalLMMixin, LemoDecoderLayerMixin, TiledMLPMixin, RecordedNormMixin, *fused_mixins())


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
    base = unwrap_model(model)
    return base._lemo.controller if isinstance(base, LemoCausalLMMixin) else None


def apply_lemo(
    model: nn.Module,
    config: LemoConfig | dict[str, Any] | str | os.PathLike | None,
    *,
    scorer: BlockScorer | None = None,
) -> nn.Module:
    """Convert ``model`` in place and return it.

    ``model``: a Hugging Face causal LM (possibly peft-wrapped, possibly built under deepspeed.zero.Init).
    ``config``: the "lemo" section (dict or LemoConfig), a DeepSpeed config dict holding one, or a config file.
    A missing section or ``"enabled": false`` leaves the model as it is.
    ``scorer``: one already built from ``config`` (``build_scorer``; launch/train.py checks it against the model
    before it starts), else built here.
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
    scorer = build_scorer(lemo_config) if scorer is None else scorer
    scorer.attach(controller)
    memory = lemo_config.memory
    apply_fused_ops(base, policy, lemo_config.fused_ops)  # innermost: the memory features below wrap it
    fix_deepspeed_cpu_checkpointing()  # DeepSpeed's synchronous CPU checkpointing, see memory/ds_checkpointing.py
    skip_needless_fetch_syncs()  # ZeRO-3 on one rank: no stream sync per module fetch, see zero_fetch.py
    offloader = None
    if memory.offload_checkpoints:
        offloader = CheckpointOffloader(generation=lambda: controller.micro_step, pinned_kind=memory.pinned_buffers,
                                        resident=memory.resident_checkpoints,
                                        layers_per_stored_input=memory.layers_per_stored_input)  # fmt: skip
    layer_memory = LayerMemory(memory.compact_saves, offloader) if memory.compact_saves or offloader else None
    for index, (layer, ratio) in enumerate(zip(layers, ratios, strict=True)):
        sparse = SparsePlan(index, controller, scorer) if ratio < 1.0 else None
        if layer_memory is not None or sparse is not None:
            swap_in(layer, LemoDecoderLayerMixin)._lemo = LayerPlan(policy, layer_memory, sparse)
        if memory.compact_saves:
            for child in layer.children():
                if is_rms_norm(child):
                    swap_in(child, RecordedNormMixin)
        if memory.tiled_mlp:
            swap_in(policy.mlp(layer), TiledMLPMixin)._lemo = MLPPlan(memory.tiled_mlp_tokens)
    final_norm = getattr(policy.decoder_model(base), "norm", None)
    if memory.segment_loss and memory.compact_saves and final_norm is not None and is_rms_norm(final_norm):
        swap_in(final_norm, RecordedNormMixin)
    # Turned on here unless the model had it, so remove_lemo turns it off only then.
    owns_attention = "_lemo_attention" not in base.__dict__ and enable_document_attention(base)
    # A KV cache needs every token of every layer: training forwards must not build one. Generation still
    # does (generation_config.use_cache), and runs dense because evaluation is dense by default.
    base.config.use_cache = False
    swap_in(base, LemoCausalLMMixin)._lemo = ModelPlan(controller, policy, memory, offloader, owns_attention)
    return model


def remove_lemo(model: nn.Module) -> nn.Module:
    """Undo apply_lemo: every module gets its original class back; the model is the plain model again."""
    base = unwrap_model(model)
    if get_controller(base) is None:
        return model
    if base._lemo.owns_attention:
        disable_document_attention(base)
    for module in base.modules():
        if isinstance(module, _CONVERTED):
            swap_out(module)
            module.__dict__.pop("_lemo", None)
            forget_fused_state(module)
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
