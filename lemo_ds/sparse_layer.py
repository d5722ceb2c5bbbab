"""The sparse decoder layer: score blocks, gather the kept tokens, run the layer on them, write back.

``apply_lemo`` converts a decoder layer in place by swapping its class for a subclass with the mixin below in
front (``SparseDecoderLayerLlamaDecoderLayer`` for ``LlamaDecoderLayer``, ...; see ``lemo_ds.class_swap``).
Nothing else about the module changes: its
parameters, their names (so checkpoints, peft adapters and ZeRO-3 partitions are untouched), its hooks, and
``isinstance`` checks (so Hugging Face's hidden-state capture and gradient checkpointing still see a decoder
layer). The subclass's ``forward`` implements the contract of LEMO.md:

- eliminated rows are the layer input, exactly, in forward and backward (write-back of the kept rows only);
- kept tokens keep their true positions (RoPE cos/sin and position ids gathered at their original rows);
- attention among kept tokens is the model's own mask restricted to them (causal, padding, documents);
- the selection is a function of the layer input; under activation checkpointing the selection made in the
  forward is reused by the recompute, so both run on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lemo_ds.controller import LemoController, current_rank
from lemo_ds.document_attention import DOCUMENTS_KWARG
from lemo_ds.errors import LemoInputError
from lemo_ds.hf_compat import CACHE_KWARGS, cache_argument
from lemo_ds.kernels import gather_rows, write_back_rows
from lemo_ds.scorers.base import BlockScorer, ScoreContext
from lemo_ds.selection import (
    forced_blocks,
    keep_block_count,
    num_blocks,
    select_blocks,
    shard_forced_blocks,
    stratified_priority,
    token_index,
)
from lemo_ds.sequence_parallel import DOC_KWARG
from lemo_ds.sequence_parallel import active as sequence_parallel

if TYPE_CHECKING:
    from lemo_ds.documents import Documents
    from lemo_ds.policies.base import DecoderLayerPolicy


@dataclass
class SparseLayerState:
    """What one converted layer needs; stored on the module as ``_lemo`` (not a submodule, no parameters)."""

    layer_index: int
    controller: LemoController
    policy: DecoderLayerPolicy
    scorer: BlockScorer
    # Selections made in a checkpointed forward, by the model's micro-step, for the recompute to reuse.
    saved_selections: dict[int, torch.Tensor] = field(default_factory=dict)


def _in_backward() -> bool:
    # Recomputation under activation checkpointing runs inside the autograd engine's backward pass.
    return torch._C._current_graph_task_id() != -1


def gather_attention_mask(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The 4D mask [b or 1, 1, s, s] restricted to kept rows [b, K] as queries and keys: [b, 1, K, K]."""
    batch, kept = rows.shape
    full = mask.expand(batch, -1, -1, -1)  # [b, 1, s, s]
    by_query = full.gather(2, rows[:, None, :, None].expand(-1, 1, -1, full.shape[-1]))  # [b, 1, K, s]
    return by_query.gather(3, rows[:, None, None, :].expand(-1, 1, kept, -1))  # [b, 1, K, K]


_HF_FLAG = "gradient_checkpointing"


class SparseDecoderLayerMixin:
    """Placed before the Hugging Face decoder layer class in the MRO of the converted layer's class.

    A sparse layer takes its activation checkpoint itself. Hugging Face's ``GradientCheckpointingLayer``
    checkpoints a layer whose ``gradient_checkpointing`` flag is set, from a wrapper whose place changed between
    releases (around ``__call__`` up to transformers 5.2x; around ``forward``, rewrapped for every subclass, this
    converted class included, since 5.24). Either way the wrapper would checkpoint the whole sparse forward, with
    the selection and the write-back inside, so the flag reads False on a sparse layer: no Hugging Face wrapper
    ever checkpoints it, in any release. What ``gradient_checkpointing_enable`` (or ``_set_gradient_checkpointing``)
    set is kept in the instance dict and read by :meth:`_lemo_checkpointing`; the checkpoint function it installed
    (``_gradient_checkpointing_func``) is the one used.
    """

    _lemo: SparseLayerState

    @property
    def gradient_checkpointing(self) -> bool:
        return False

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.__dict__[_HF_FLAG] = value

    def _lemo_checkpointing(self) -> bool:
        """Whether this call takes an activation checkpoint: asked for, training, and a backward to replay it in."""
        return self.training and torch.is_grad_enabled() and bool(self.__dict__.get(_HF_FLAG, False))

    def _lemo_checkpoints_kept_rows(self) -> bool:
        """Sparsity-aware checkpointing: instead of checkpointing the whole layer call (which stores the whole
        input [b, s, h] for the recompute), checkpoint only the original layer on the kept rows [b, K, h]. The
        gather and the write-back need nothing stored (their gradients are a scatter and a gather by index),
        so the layer stores K rows instead of s."""
        state = self._lemo
        return (
            self._lemo_checkpointing()
            and state.controller.config.memory.sparse_checkpointing
            and state.controller.keep_ratio(state.layer_index, self.training) < 1.0
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError(
                f"{type(self).__name__}: pass everything after hidden_states as keyword arguments "
                "(as Hugging Face models do)"
            )
        if self._lemo_checkpointing() and not self._lemo_checkpoints_kept_rows():
            # The whole layer under one checkpoint, as Hugging Face would take it: its input is stored, and the
            # recompute reuses the forward's selection (_lemo_selection). hidden_states goes positionally so that
            # reentrant checkpointing sees it as an input.
            kwargs = {name: value for name, value in kwargs.items() if name not in CACHE_KWARGS}
            body = partial(self._lemo_forward, whole_layer_checkpointed=True, **kwargs)
            return self._gradient_checkpointing_func(body, hidden_states)
        return self._lemo_forward(hidden_states, whole_layer_checkpointed=False, **kwargs)

    def _lemo_forward(self, hidden_states: torch.Tensor, whole_layer_checkpointed: bool, **kwargs: Any) -> torch.Tensor:
        state = self._lemo
        policy = state.policy
        batch, seq = hidden_states.shape[:2]
        ratio = state.controller.keep_ratio(state.layer_index, self.training)
        if ratio >= 1.0:  # dense: a dense phase of the schedule, or evaluation
            if self.training and not _in_backward():
                state.controller.record(state.layer_index, seq, seq)
            return super().forward(hidden_states, **kwargs)
        if cache_argument(kwargs) is not None:
            raise LemoInputError(
                "token elimination runs without a KV cache (a cache needs every token of every layer): call the "
                "model with use_cache=False (apply_lemo sets config.use_cache = False; generation is dense unless "
                "lemo.apply_in_eval is true)"
            )

        block = state.controller.config.block_size
        if seq < block:
            raise LemoInputError(
                f"sequence of {seq} tokens is shorter than one lemo block ({block} tokens); use sequences of at "
                f"least {block} tokens or a smaller lemo.block_size"
            )
        sp = sequence_parallel()
        if sp is not None and seq % block:
            raise LemoInputError(
                f"under sequence parallelism each rank's shard must be whole lemo blocks: this shard has {seq} "
                f"tokens, block_size is {block}; use a sequence length that is a multiple of "
                f"{sp.size} x {block}"
            )
        cos, sin = kwargs[policy.position_embeddings_kwarg]  # [b or 1, s, d]
        mask = kwargs.get(policy.mask_kwarg)  # [b or 1, 1, s, s] or None
        # Under sequence parallelism the model's mask covers this rank's shard only: the scorer uses it (the
        # per-shard rule, lemo_ds.sequence_parallel), the layer does not (Ulysses attends over all shards).
        blocks = self._lemo_selection(hidden_states, ratio, mask, (cos, sin), kwargs.get(DOCUMENTS_KWARG),
                                      whole_layer_checkpointed)  # [b, k]  # fmt: skip
        if sp is not None:
            mask = None
        rows = token_index(blocks, block, seq)  # [b, K]
        backend = state.controller.config.kernels

        kept_hidden, kept_cos, kept_sin = gather_rows(hidden_states, rows, cos, sin, backend=backend)  # [b, K, *]
        kept_kwargs = dict(kwargs)
        kept_kwargs[policy.position_embeddings_kwarg] = (kept_cos, kept_sin)
        position_ids = kwargs.get(policy.position_ids_kwarg)  # [b or 1, s]
        if position_ids is not None:
            kept_kwargs[policy.position_ids_kwarg] = position_ids.expand(batch, -1).gather(1, rows)  # [b, K]
        if mask is not None:
            kept_kwargs[policy.mask_kwarg] = gather_attention_mask(mask, rows)  # [b, 1, K, K]
        elif sp is not None:
            kept_kwargs[policy.mask_kwarg] = None
        documents = kwargs.get(DOCUMENTS_KWARG)
        if documents is not None:  # each document's kept rows are one run again (rows ascend)
            kept_kwargs[DOCUMENTS_KWARG] = documents.gather(rows)
        if kwargs.get(DOC_KWARG) is not None:  # document keys travel with the kept rows (sequence parallel)
            kept_kwargs[DOC_KWARG] = kwargs[DOC_KWARG].expand(batch, -1).gather(1, rows)  # [b, K]
        layer_forward = partial(super().forward, **kept_kwargs)
        kept_only = not whole_layer_checkpointed and self._lemo_checkpoints_kept_rows()
        if kept_only:
            kept_out = self._gradient_checkpointing_func(layer_forward, kept_hidden)  # [b, K, h]
        else:
            kept_out = layer_forward(kept_hidden)  # [b, K, h]
        if isinstance(kept_out, tuple):  # families that still return (hidden_states, ...)
            kept_out = kept_out[0]

        inplace = (
            state.controller.config.inplace_writeback
            and not whole_layer_checkpointed  # that checkpoint keeps our input for the recompute
            and not state.controller.keeps_layer_outputs  # output_hidden_states holds every layer's output
        )
        if self.training and not _in_backward():  # a checkpoint's recompute is not a second pass of data
            state.controller.record(state.layer_index, rows.shape[1], seq)
            state.controller.note_selection(blocks, rows, seq)
        return write_back_rows(hidden_states, kept_out, rows, inplace=inplace, backend=backend)

    def _lemo_selection(
        self,
        hidden_states: torch.Tensor,  # [b, s, h]
        ratio: float,
        mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        documents: Documents | None,
        checkpointed: bool,
    ) -> torch.Tensor:
        """Kept block indices [b, k]: reused from the forward when this is a whole-layer checkpoint's recompute
        (a kept-rows checkpoint recomputes only the layer on the kept rows, after the selection)."""
        state = self._lemo
        controller = state.controller
        if checkpointed and _in_backward():
            saved = state.saved_selections.pop(controller.micro_step, None)
            if saved is not None:
                return saved
        config = controller.config
        seq = hidden_states.shape[1]
        sp = sequence_parallel()
        if sp is None:
            forced = forced_blocks(seq, config.block_size, config.always_keep_blocks)
            n = num_blocks(seq, config.block_size)
            keep = keep_block_count(n, ratio, config.min_blocks, len(forced))
        else:
            n = num_blocks(seq, config.block_size)
            forced, most_forced = shard_forced_blocks(n, sp.size, sp.rank, config.always_keep_blocks)
            keep = keep_block_count(n, ratio, config.min_blocks, most_forced)  # equal on every SP rank
        context = ScoreContext(
            layer_index=state.layer_index,
            block_size=config.block_size,
            position_embeddings=position_embeddings,
            attention_mask=mask,
            policy=state.policy,
            step=controller.step,
            micro_step=controller.micro_step,
            rank=current_rank(),
            documents=documents,
        )
        with torch.no_grad():
            scores = state.scorer.score(self, hidden_states.detach(), context)  # [b, n]
            if config.selection_window:
                scores = stratified_priority(scores, config.selection_window)  # [b, n]
            earlier = controller.last_kept_blocks  # [b, k'] kept by the previous sparse layer of this forward
            if config.nested_selection and earlier is not None and earlier.shape[0] == scores.shape[0]:
                # Blocks eliminated earlier rank below every block still in play (kept blocks first).
                allowed = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, earlier, True)  # [b, n]
                scores = torch.where(allowed, scores.float(), torch.finfo(torch.float32).min)
            blocks = select_blocks(scores, keep, forced)  # [b, k]
        if checkpointed and not _in_backward():
            # Keep only recent entries: a forward whose backward never comes must not leak.
            for stale in [key for key in state.saved_selections if key < controller.micro_step - 8]:
                del state.saved_selections[stale]
            state.saved_selections[controller.micro_step] = blocks
        return blocks


def is_sparse_layer(layer: nn.Module) -> bool:
    return isinstance(layer, SparseDecoderLayerMixin)
