"""The causal LM's forward with the segment loss: given labels, no full [b, s, V] logits are ever made."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from lemo_ds.config import LemoMemoryConfig
from lemo_ds.hf_compat import causal_lm_output
from lemo_ds.memory.compact import compaction
from lemo_ds.memory.segment_loss import IGNORE_INDEX, segment_lm_loss, shift_labels


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
            head = self._lemo_policy.lm_head(self)
            if (self.training and controller is not None and controller.config.loss_tokens == "processed"
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
