"""The causal LM's forward with the segment loss: given labels, no full [b, s, V] logits are ever made."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from lemo_ds.config import LemoMemoryConfig
from lemo_ds.memory.compact import compaction
from lemo_ds.memory.segment_loss import segment_lm_loss


class SegmentLossCausalLMMixin:
    """Placed before the ``*ForCausalLM`` class; ``_lemo_memory`` and ``_lemo_policy`` are set by apply_lemo."""

    _lemo_memory: LemoMemoryConfig

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs: Any):
        if labels is None:  # logits wanted (generation, evaluation without labels): the model's own forward
            return super().forward(input_ids=input_ids, **kwargs)
        memory = self._lemo_memory
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)  # no logits are made
        # Targets shifted before sequence-parallel sharding (Hugging Face's loss takes them the same way).
        targets = kwargs.pop("shift_labels", None)
        decoder = self._lemo_policy.decoder_model(self)
        controller = getattr(self, "_lemo_controller", None)
        # With compaction, the loss stores the final norm's input (the last layer's output, [b, s, h]) and not the
        # normed states it is given nor the norm's float32 copy: 2h instead of 6h bytes per token (3 GiB -> 1 GiB
        # at 128K on Llama-3-8B). The decoder layers' own compaction nests inside (see memory/compact.py).
        with compaction() if memory.compact_saves else contextlib.nullcontext():
            outputs = decoder(input_ids=input_ids, **kwargs)
            if (self.training and controller is not None and controller.config.loss_tokens == "processed"
                    and controller.processed_rows is not None):  # fmt: skip
                # Row t predicts label t + 1 (target t once shifted): drop the targets whose row skipped a layer.
                skipped = ~controller.processed_rows.to(labels.device)  # [b, s]
                if targets is not None:  # already shifted (sequence parallelism): target t belongs to row t
                    targets = targets.masked_fill(skipped, -100)
                else:
                    labels = torch.cat([labels[:, :1], labels[:, 1:].masked_fill(skipped[:, :-1], -100)], dim=1)
                num_items = None  # the count changed: the mean over the counted tokens
            loss = segment_lm_loss(self._lemo_policy.lm_head(self), outputs.last_hidden_state, labels,
                                   memory.segment_tokens, num_items, memory.segment_loss_impl,
                                   shift_labels=targets)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)
