"""The converted causal LM: counts the model's forwards for the controller, and computes the loss by segments.

``apply_lemo`` swaps the ``*ForCausalLM`` class for ``LemoCausalLM<Name>`` (``LemoCausalLMMixin`` in front, see
``lemo_ds.class_swap``) and stores one ``ModelPlan`` on it as ``_lemo``. Its forward, in order:

1. tells the controller a forward starts (the optimizer step it follows, the forward counter, whether the caller
   keeps every layer's output) and counts the dense layers' tokens;
2. given labels and the segment loss, runs the decoder and computes Hugging Face's loss segment by segment
   (``lemo_ds.memory.segment_loss``): no [b, s, V] logits are ever made; otherwise the model's own forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lemo_ds.class_swap import root_class
from lemo_ds.config import LemoMemoryConfig
from lemo_ds.controller import LemoController
from lemo_ds.hf_compat import causal_lm_output
from lemo_ds.memory.compact import compaction
from lemo_ds.memory.offload import CheckpointOffloader
from lemo_ds.memory.segment_loss import IGNORE_INDEX, segment_lm_loss, shift_labels

if TYPE_CHECKING:
    from lemo_ds.policies.base import DecoderLayerPolicy


@dataclass(eq=False)
class ModelPlan:
    """What the converted model holds; stored on the causal LM as ``_lemo``."""

    controller: LemoController
    policy: DecoderLayerPolicy
    memory: LemoMemoryConfig
    offloader: CheckpointOffloader | None  # shared by the layers' checkpoints (memory/offload.py)
    owns_attention: bool  # apply_lemo turned document attention on, so remove_lemo turns it off


class LemoCausalLMMixin:
    """Placed before the ``*ForCausalLM`` class."""

    _lemo: ModelPlan

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The converted class shows the model's own forward signature: Hugging Face's Trainer keeps only the batch
        # columns that ``model.forward`` names (input_ids, position_ids, labels...), so ``(*args, **kwargs)`` would
        # make it drop them all.
        super().__init_subclass__(**kwargs)
        model_forward = cls.__mro__[cls.__mro__.index(LemoCausalLMMixin) + 1].forward

        @functools.wraps(LemoCausalLMMixin.forward)
        def forward(self, *args: Any, **kwargs: Any):
            return LemoCausalLMMixin.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(model_forward)
        cls.forward = forward

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own ``save_pretrained``, as the model's own class: transformers writes the class name into
        config.json's ``architectures``, which tools that pick a model class by it (vLLM, Auto classes) must read as
        ``LlamaForCausalLM``, not ``LemoCausalLMLlamaForCausalLM``. The weights are the model's anyway."""
        converted = type(self)
        self.__class__ = root_class(self)
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = converted

    def forward(self, *args: Any, **kwargs: Any):
        if args:  # positional arguments as the model's own forward names them
            kwargs = {**inspect.signature(super().forward).bind_partial(*args).arguments, **kwargs}
        plan = self._lemo
        _start_forward(plan.controller, self, kwargs)
        labels = kwargs.get("labels")
        if labels is None or not plan.memory.segment_loss:  # logits wanted, or Hugging Face's loss asked for
            return super().forward(**kwargs)
        return self._lemo_segment_loss_forward(**kwargs)

    def _lemo_segment_loss_forward(
        self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs: Any
    ):
        plan = self._lemo
        memory, controller = plan.memory, plan.controller
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)  # no logits are made
        # Targets shifted before sequence-parallel sharding (Hugging Face's loss takes them the same way).
        targets = kwargs.pop("shift_labels", None)
        decoder = plan.policy.decoder_model(self)
        # With compaction, the loss stores the final norm's input (the last layer's output, [b, s, h]) and not the
        # normed states it is given nor the norm's float32 copy: 2h instead of 6h bytes per token. The decoder
        # layers' own compaction nests inside (see memory/compact.py).
        with compaction() if memory.compact_saves else contextlib.nullcontext():
            outputs = decoder(input_ids=input_ids, **kwargs)
            head = plan.policy.lm_head(self)
            if (self.training and controller.config.loss_tokens == "processed"
                    and controller.processed_rows is not None):  # fmt: skip
                # Row t predicts label t + 1 (target t once shifted): the targets whose row skipped a layer.
                skipped = ~controller.processed_rows.to(labels.device)  # [b, s]
                if targets is None:
                    targets = shift_labels(labels)  # [b, s]
                loss = _processed_loss(head, outputs.last_hidden_state, targets, skipped,
                                       controller.config.skipped_loss_weight, memory)  # fmt: skip
            else:
                loss = segment_lm_loss(head, outputs.last_hidden_state, labels, memory.segment_tokens, num_items,
                                       memory.segment_loss_impl, shift_labels=targets)  # fmt: skip
        return causal_lm_output(loss, outputs)


def _start_forward(controller: LemoController, model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    # output_hidden_states (the call's, else the config's) makes the model keep a reference to every layer's
    # output, which a later sparse layer's in-place write-back would change.
    wants_hidden_states = kwargs.get("output_hidden_states")
    if wants_hidden_states is None:
        wants_hidden_states = getattr(model.config, "output_hidden_states", False)
    controller.on_model_forward(keeps_layer_outputs=bool(wants_hidden_states), training=model.training)
    if model.training:
        tokens = _tokens_in(kwargs)
        if tokens:
            controller.record_dense(tokens)


def _tokens_in(kwargs: dict[str, Any]) -> int:
    input_ids = kwargs.get("input_ids")
    if input_ids is not None:
        return input_ids.shape[-1]
    embeds = kwargs.get("inputs_embeds")
    return embeds.shape[1] if embeds is not None else 0


def _processed_loss(
    head: torch.nn.Module,
    hidden: torch.Tensor,  # [b, s, h]
    targets: torch.Tensor,  # [b, s] shifted
    skipped: torch.Tensor,  # [b, s] bool: the row skipped a sparse layer
    weight: float,
    memory: LemoMemoryConfig,
) -> torch.Tensor:
    """(sum of the processed targets' losses + weight x sum of the skipped ones') / (n_processed + weight x
    n_skipped): the mean over the processed targets when weight is 0. The count changed, so any
    num_items_in_batch is not used."""
    kept = targets.masked_fill(skipped, IGNORE_INDEX)  # [b, s]
    if weight == 0.0:
        return segment_lm_loss(head, hidden, None, memory.segment_tokens, None, memory.segment_loss_impl,
                               shift_labels=kept)  # fmt: skip
    dropped = targets.masked_fill(~skipped, IGNORE_INDEX)  # [b, s]
    count = (kept != IGNORE_INDEX).sum() + weight * (dropped != IGNORE_INDEX).sum()
    sums = [segment_lm_loss(head, hidden, None, memory.segment_tokens, 1, memory.segment_loss_impl, shift_labels=t)
            for t in (kept, dropped)]  # fmt: skip
    return (sums[0] + weight * sums[1]) / count.clamp(min=1).to(torch.float32)
