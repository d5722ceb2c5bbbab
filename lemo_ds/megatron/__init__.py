"""LeMo token elimination for Megatron-core GPT models (megatron-core 0.16; ``pip install "lemo_ds[megatron]"``).

- :func:`get_lemo_gpt_layer_local_spec` / :func:`get_lemo_block_spec`: a ``TransformerBlockSubmodules`` with
  per-layer specs (dense layers stock, sparse layers ``LemoTransformerLayer``) from a "lemo" config section.
- :class:`LemoTransformerLayer`: the sparse layer (gather kept tokens [s, b, h] with their RoPE angles, attention
  mask or packed-sequence documents, run the stock layer on them, write back); :func:`lemo_layer_class` makes one
  from any TransformerLayer subclass.
- :func:`attach_lemo` / :func:`lemo_controller`: the controller shared by a model's sparse layers (schedule,
  step, forward counter, measured keep ratios).
- :func:`megatron_on_cpu`: the patches that let Megatron-core's local spec run on a CPU (tests, small examples).
"""

from lemo_ds.megatron.cpu import megatron_on_cpu
from lemo_ds.megatron.layer import LemoTransformerLayer, LemoTransformerLayerMixin, lemo_layer_class
from lemo_ds.megatron.spec import (
    attach_lemo,
    get_lemo_block_spec,
    get_lemo_gpt_layer_local_spec,
    lemo_controller,
    lemo_layers,
)

__all__ = [
    "LemoTransformerLayer",
    "LemoTransformerLayerMixin",
    "attach_lemo",
    "get_lemo_block_spec",
    "get_lemo_gpt_layer_local_spec",
    "lemo_controller",
    "lemo_layer_class",
    "lemo_layers",
    "megatron_on_cpu",
]
