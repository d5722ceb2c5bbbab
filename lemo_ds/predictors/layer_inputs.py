"""Run a frozen model over batches and hand every sparse layer's input to a callback (forward pre-hooks).

The model runs in eval mode under ``torch.no_grad``: its sparse layers run dense (evaluation is dense unless
``apply_in_eval``), so the callbacks see the inputs of the dense model, and nothing of the model trains. Under
ZeRO-3 the callbacks may call the layer's submodules (the oracle does): their own hooks gather their parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lemo_ds import distributed
from lemo_ds.document_attention import DOCUMENTS_KWARG
from lemo_ds.policies import policy_for, unwrap_model
from lemo_ds.score_context import ScoreContext

LayerCallback = Callable[[nn.Module, torch.Tensor, ScoreContext], None]  # (layer, input [b, s, h], context)


def for_each_layer_input(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    layers: list[int],
    block_size: int,
    callback: LayerCallback,
    after_batch: Callable[[int], None] | None = None,
) -> int:
    """Forward every batch (``labels`` dropped) and call ``callback`` on the input of each layer in ``layers``;
    ``after_batch(batch number from 1)`` after each. Returns the number of batches."""
    base = unwrap_model(model)
    policy = policy_for(base)
    decoder_layers = policy.decoder_layers(base)

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # [b, s, h]
            context = ScoreContext(
                layer_index=index,
                block_size=block_size,
                position_embeddings=kwargs[policy.position_embeddings_kwarg],
                attention_mask=kwargs.get(policy.mask_kwarg),
                documents=kwargs.get(DOCUMENTS_KWARG),
                policy=policy,
                step=0,
                micro_step=0,
                rank=distributed.rank(),
            )
            callback(module, hidden, context)

        return hook

    handles = [decoder_layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in layers]
    # Only the hooks' work matters: one row of logits is enough where the model takes logits_to_keep.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for count, batch in enumerate(batches, start=1):
                model(**{key: value for key, value in batch.items() if key != "labels"}, **extra)
                if after_batch is not None:
                    after_batch(count)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return count
