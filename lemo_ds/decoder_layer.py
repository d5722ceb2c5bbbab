"""The converted Hugging Face decoder layer: the memory stack around the layer, and token elimination where sparse.

``apply_lemo`` converts a decoder layer in place by swapping its class for ``Lemo<Name>`` = (``LemoDecoderLayerMixin``,
the model's class), see ``lemo_ds.class_swap``, and storing one ``LayerPlan`` on it as ``_lemo``. Nothing else about
the module changes: its parameters and their names (checkpoints, peft adapters and ZeRO-3 partitions are untouched),
its hooks, and ``isinstance`` checks (Hugging Face's hidden-state capture and gradient checkpointing still see a
decoder layer). The forward, in order:

1. a dense layer (or a sparse one in a dense phase) runs the model's layer on every row, inside the memory context;
2. a sparse layer asks its ``SparsePlan`` (``lemo_ds.core.plan``) which blocks to keep, gathers the kept rows with
   their RoPE cos/sin, position ids, mask and documents (``[b, s, *] -> [b, K, *]``), runs the model's layer on
   them inside the memory context (under a kept-rows checkpoint where asked), and writes the result back into the
   kept rows; eliminated rows are the layer input, exactly, in forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lemo_ds.controller import current_rank
from lemo_ds.core.plan import SparsePlan
from lemo_ds.core.selection import token_index
from lemo_ds.document_attention import DOCUMENTS_KWARG
from lemo_ds.errors import LemoInputError
from lemo_ds.hf_compat import CACHE_KWARGS, cache_argument
from lemo_ds.kernels import gather_rows, write_back_rows
from lemo_ds.memory.layer import LayerMemory
from lemo_ds.scorers.base import ScoreContext
from lemo_ds.sequence_parallel import DOC_KWARG
from lemo_ds.sequence_parallel import active as sequence_parallel

if TYPE_CHECKING:
    from lemo_ds.policies.base import DecoderLayerPolicy


@dataclass(eq=False)
class LayerPlan:
    """What one converted decoder layer does; stored on the module as ``_lemo`` (not a submodule, no parameters)."""

    policy: DecoderLayerPolicy
    memory: LayerMemory | None = None  # None: no memory feature on this layer
    sparse: SparsePlan | None = None  # None: a dense layer


def gather_attention_mask(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The 4D mask [b or 1, 1, s, s] restricted to kept rows [b, K] as queries and keys: [b, 1, K, K]."""
    batch, kept = rows.shape
    full = mask.expand(batch, -1, -1, -1)  # [b, 1, s, s]
    by_query = full.gather(2, rows[:, None, :, None].expand(-1, 1, -1, full.shape[-1]))  # [b, 1, K, s]
    return by_query.gather(3, rows[:, None, None, :].expand(-1, 1, kept, -1))  # [b, 1, K, K]


_HF_FLAG = "gradient_checkpointing"
_HF_FUNC = "_gradient_checkpointing_func"


class LemoDecoderLayerMixin:
    """Placed before the Hugging Face decoder layer class in the MRO of the converted layer's class.

    A sparse layer takes its activation checkpoint itself. Hugging Face's ``GradientCheckpointingLayer``
    checkpoints a layer whose ``gradient_checkpointing`` flag is set, from a wrapper whose place changed between
    releases (around ``__call__`` up to transformers 5.2x; around ``forward``, rewrapped for every subclass, this
    converted class included, since 5.24). Either way the wrapper would checkpoint the whole sparse forward, with
    the selection and the write-back inside, so the flag reads False on a sparse layer: no Hugging Face wrapper
    ever checkpoints it, in any release. What ``gradient_checkpointing_enable`` (or ``_set_gradient_checkpointing``)
    set is kept in the instance dict and read by :meth:`_lemo_checkpointing`. A dense converted layer reads the flag
    as set and is checkpointed by Hugging Face as before. Either way ``_gradient_checkpointing_func`` hands out the
    function Hugging Face installed, offloading its stored input where the memory plan says so.
    """

    _lemo: LayerPlan

    @property
    def gradient_checkpointing(self) -> bool:
        return self._lemo.sparse is None and bool(self.__dict__.get(_HF_FLAG, False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.__dict__[_HF_FLAG] = value

    @property
    def _gradient_checkpointing_func(self) -> Any:
        try:
            raw = self.__dict__[_HF_FUNC]
        except KeyError:
            raise AttributeError(_HF_FUNC) from None
        memory = self._lemo.memory
        return raw if memory is None else memory.checkpoint_function(raw)

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, value: Any) -> None:
        self.__dict__[_HF_FUNC] = value

    # ---- forward --------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sparse = self._lemo.sparse
        if sparse is None:
            return self._lemo_layer(hidden_states, *args, **kwargs)
        if args:
            raise TypeError(
                f"{type(self).__name__}: pass everything after hidden_states as keyword arguments "
                "(as Hugging Face models do)"
            )
        if self._lemo_checkpointing() and not self._lemo_checkpoints_kept_rows():
            # The whole layer under one checkpoint, as Hugging Face would take it: its input is stored, and the
            # recompute takes the forward's selection back by ``key``. hidden_states goes positionally so that
            # reentrant checkpointing sees it as an input.
            kwargs = {name: value for name, value in kwargs.items() if name not in CACHE_KWARGS}
            body = partial(self._lemo_sparse_forward, checkpoint_key=object(), **kwargs)
            return self._gradient_checkpointing_func(body, hidden_states)
        return self._lemo_sparse_forward(hidden_states, checkpoint_key=None, **kwargs)

    def _lemo_layer(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own layer, inside the memory context."""
        memory = self._lemo.memory
        if memory is None:
            return super().forward(*args, **kwargs)
        with memory.context():
            return super().forward(*args, **kwargs)

    def _lemo_checkpointing(self) -> bool:
        """Whether this call takes an activation checkpoint: asked for, training, and a backward to replay it in."""
        return self.training and torch.is_grad_enabled() and bool(self.__dict__.get(_HF_FLAG, False))

    def _lemo_checkpoints_kept_rows(self) -> bool:
        """Sparsity-aware checkpointing: instead of checkpointing the whole layer call (which stores the whole
        input [b, s, h] for the recompute), checkpoint only the original layer on the kept rows [b, K, h]. The
        gather and the write-back need nothing stored (their gradients are a scatter and a gather by index),
        so the layer stores K rows instead of s."""
        sparse = self._lemo.sparse
        return (
            self._lemo_checkpointing()
            and sparse.config.memory.sparse_checkpointing
            and sparse.keep_ratio(self.training) < 1.0
        )

    def _lemo_sparse_forward(
        self, hidden_states: torch.Tensor, checkpoint_key: object | None, **kwargs: Any
    ) -> torch.Tensor:  # hidden_states [b, s, h]
        """``checkpoint_key``: set when this call is the body of a whole-layer checkpoint (its recompute reuses the
        forward's selection, and its input must stay as it is)."""
        plan, policy = self._lemo.sparse, self._lemo.policy
        batch, seq = hidden_states.shape[:2]
        ratio = plan.keep_ratio(self.training)
        if ratio >= 1.0:  # dense: a dense phase of the schedule, or evaluation
            plan.account_dense(seq, self.training)
            return self._lemo_layer(hidden_states, **kwargs)
        if cache_argument(kwargs) is not None:
            raise LemoInputError(
                "token elimination runs without a KV cache (a cache needs every token of every layer): call the "
                "model with use_cache=False (apply_lemo sets config.use_cache = False; generation is dense unless "
                "lemo.apply_in_eval is true)"
            )
        sp = sequence_parallel()
        plan.check_length(seq, sp)
        cos, sin = kwargs[policy.position_embeddings_kwarg]  # [b or 1, s, d]
        mask = kwargs.get(policy.mask_kwarg)  # [b or 1, 1, s, s] or None
        documents = kwargs.get(DOCUMENTS_KWARG)

        def score() -> torch.Tensor:  # [b, n]; not called where the recompute reuses the forward's selection
            context = ScoreContext(
                layer_index=plan.layer_index,
                block_size=plan.config.block_size,
                position_embeddings=(cos, sin),
                # Under sequence parallelism the model's mask covers this rank's shard only: the scorer uses it (the
                # per-shard rule, lemo_ds.sequence_parallel), the layer does not (Ulysses attends over all shards).
                attention_mask=mask,
                policy=policy,
                step=plan.controller.step,
                micro_step=plan.controller.micro_step,
                rank=current_rank(),
                documents=documents,
            )
            return plan.scorer.score(self, hidden_states.detach(), context)

        blocks = plan.select(
            seq,
            ratio,
            score,
            checkpointed=checkpoint_key is not None,
            key=checkpoint_key,
            sp=sp,
        )  # [b, k]
        rows = token_index(blocks, plan.config.block_size, seq)  # [b, K]
        backend = plan.config.kernels

        kept_hidden, kept_cos, kept_sin = gather_rows(hidden_states, rows, cos, sin, backend=backend)  # [b, K, *]
        kept_kwargs = dict(kwargs)
        kept_kwargs[policy.position_embeddings_kwarg] = (kept_cos, kept_sin)
        position_ids = kwargs.get(policy.position_ids_kwarg)  # [b or 1, s]
        if position_ids is not None:
            kept_kwargs[policy.position_ids_kwarg] = position_ids.expand(batch, -1).gather(1, rows)  # [b, K]
        if sp is not None:
            kept_kwargs[policy.mask_kwarg] = None
        elif mask is not None:
            kept_kwargs[policy.mask_kwarg] = gather_attention_mask(mask, rows)  # [b, 1, K, K]
        if documents is not None:  # each document's kept rows are one run again (rows ascend)
            kept_kwargs[DOCUMENTS_KWARG] = documents.gather(rows)
        if kwargs.get(DOC_KWARG) is not None:  # document keys travel with the kept rows (sequence parallel)
            kept_kwargs[DOC_KWARG] = kwargs[DOC_KWARG].expand(batch, -1).gather(1, rows)  # [b, K]
        layer_forward = partial(self._lemo_layer, **kept_kwargs)
        if checkpoint_key is None and self._lemo_checkpoints_kept_rows():
            kept_out = self._gradient_checkpointing_func(layer_forward, kept_hidden)  # [b, K, h]
        else:
            kept_out = layer_forward(kept_hidden)  # [b, K, h]
        if isinstance(kept_out, tuple):  # families that still return (hidden_states, ...)
            kept_out = kept_out[0]

        plan.account(blocks, rows, seq, self.training)
        # A whole-layer checkpoint keeps our input for the recompute: no overwriting it.
        inplace = plan.writes_in_place() and checkpoint_key is None
        return write_back_rows(hidden_states, kept_out, rows, inplace=inplace, backend=backend)


def is_sparse_layer(layer: nn.Module) -> bool:
    return isinstance(layer, LemoDecoderLayerMixin) and layer._lemo.sparse is not None
