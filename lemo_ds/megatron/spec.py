"""Layer specs for Megatron-core GPT models with LeMo token elimination, and the controller that drives them.

A Megatron model is built from specs, so token elimination enters as a spec: a ``TransformerBlockSubmodules``
whose per-layer specs are the stock layer spec for dense layers and the same spec with ``LemoTransformerLayer``
(or ``LemoTransformerLayer<YourLayerClass>``) as the module for sparse ones. Which layers are sparse, and their keep
ratios, come from a ``LemoConfig`` (``lemo_ds.config.parse_lemo_config``, the "lemo" section of lemo_ds's DeepSpeed
configs): ``layer_keep_ratios(num_layers)`` gives 1.0 (dense) to the first half and the last layer by default. Keys the
section leaves out take LeMo's own rule (``with_megatron_defaults``: the oracle, independent choices), not the Hugging
Face path's defaults, which need lemo_ds's loss and predictors.

    lemo = parse_lemo_config({"keep_ratio": 0.4, "block_size": 64})
    block_spec = get_lemo_gpt_layer_local_spec(lemo, config=transformer_config)
    model = GPTModel(transformer_config, transformer_layer_spec=block_spec, vocab_size=..., ...)
    controller = attach_lemo(model)          # counts forwards; call controller.set_step(step) every step

Every sparse layer of one spec shares one ``LemoController`` (lemo_ds.controller): the schedule (dense steps, then a
ramp to the target ratios), the optimizer step it follows (``set_step``), the forward counter (``attach_lemo``
installs a forward pre-hook that advances it) and the measured share of tokens each layer kept (``stats()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import nn

from lemo_ds.config import LemoConfig, parse_lemo_config
from lemo_ds.controller import LemoController
from lemo_ds.errors import LemoConfigError
from lemo_ds.megatron.layer import LemoTransformerLayerMixin, lemo_layer_class
from lemo_ds.megatron_section import refuse_unhonoured_keys, with_megatron_defaults


def get_lemo_block_spec(
    layer_spec: ModuleSpec,
    lemo: LemoConfig | dict[str, Any] | None,
    num_layers: int | None = None,
    *,
    config: TransformerConfig | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    controller: LemoController | None = None,
    layer_norm: Any = None,
) -> TransformerBlockSubmodules:
    """Per-layer specs from one stock layer spec (local, Transformer Engine, yours): sparse layers get
    ``lemo_layer_class(module)`` with the same submodules and params, dense layers keep ``layer_spec`` itself.

    Args:
        layer_spec: a ModuleSpec whose module is a megatron.core TransformerLayer (sub)class.
        lemo: the "lemo" section (dict or LemoConfig); None, or ``enabled: false``, gives every layer the stock spec.
        num_layers: layers of the whole model (default: ``config.num_layers``).
        config: the model's TransformerConfig. With it the specs are sliced to this pipeline stage (as Megatron's
            ``get_gpt_decoder_block_spec`` does), for ``vp_stage`` / ``pp_rank`` (default: this rank's).
        controller: share one controller between several specs (default: a new one).
        layer_norm: the block's final norm (default: Megatron's LayerNormImpl, as a layer ModuleSpec gets).
    """
    if num_layers is None:
        if config is None:
            raise LemoConfigError("get_lemo_block_spec: pass num_layers or the model's TransformerConfig")
        num_layers = config.num_layers
    elif config is not None and config.num_layers != num_layers:
        raise LemoConfigError(f"num_layers={num_layers} but config.num_layers={config.num_layers}")
    lemo = parse_lemo_config(lemo)
    if lemo is not None and lemo.enabled:
        refuse_unhonoured_keys(lemo)
        lemo = with_megatron_defaults(lemo)
    ratios = lemo.layer_keep_ratios(num_layers) if lemo is not None and lemo.enabled else [1.0] * num_layers
    specs: list[ModuleSpec] = [layer_spec] * num_layers
    if any(ratio < 1.0 for ratio in ratios):
        if controller is None:
            controller = LemoController(lemo, ratios)
        elif len(controller.target_ratios) != num_layers:
            raise LemoConfigError(
                f"the controller was made for {len(controller.target_ratios)} layers, the model has {num_layers}"
            )
        sparse = dataclasses.replace(
            layer_spec,
            module=lemo_layer_class(layer_spec.module),
            params={**layer_spec.params, "lemo_controller": controller},
        )
        specs = [sparse if ratio < 1.0 else layer_spec for ratio in ratios]
    if config is not None:  # this pipeline stage's layers only
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        specs = specs[offset : offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=layer_norm or LayerNormImpl)


def get_lemo_gpt_layer_local_spec(
    lemo: LemoConfig | dict[str, Any] | None,
    num_layers: int | None = None,
    *,
    config: TransformerConfig | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    controller: LemoController | None = None,
    **local_spec_kwargs: Any,
) -> TransformerBlockSubmodules:
    """Megatron-core's local GPT layer spec (``get_gpt_layer_local_spec(**local_spec_kwargs)``: no Transformer
    Engine, runs wherever PyTorch does) with token elimination in the layers ``lemo`` makes sparse."""
    layer_spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    return get_lemo_block_spec(
        layer_spec, lemo, num_layers, config=config, vp_stage=vp_stage, pp_rank=pp_rank, controller=controller
    )


def lemo_controller(model: nn.Module) -> LemoController | None:
    """The controller of the model's sparse layers (None when it has none)."""
    for module in model.modules():
        if isinstance(module, LemoTransformerLayerMixin):
            return module._lemo.controller
    return None


def lemo_layers(model: nn.Module) -> list[nn.Module]:
    """The model's sparse layers, in order."""
    return [module for module in model.modules() if isinstance(module, LemoTransformerLayerMixin)]


def attach_lemo(model: nn.Module) -> LemoController | None:
    """Install a forward pre-hook on ``model`` (a GPTModel, or the module whose forward is one micro-batch) that
    advances the controller's forward counter (the random scorer's key) and counts the tokens of its dense layers
    for ``stats()``. Returns the controller, or None for a model without sparse layers. Call it once per model."""
    controller = lemo_controller(model)
    if controller is None:
        return None
    if getattr(model, "_lemo_hooked", False):
        raise LemoConfigError("attach_lemo: this model already has its lemo hook")

    def pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
        controller.on_model_forward(training=module.training)
        input_ids = args[0] if args else kwargs.get("input_ids")  # [b, s] (thd: [1, t])
        if module.training and input_ids is not None:
            controller.record_dense(input_ids.shape[-1])

    model.register_forward_pre_hook(pre_forward, with_kwargs=True)
    model._lemo_hooked = True
    return controller
