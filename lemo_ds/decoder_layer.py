"""The converted Hugging Face decoder layer: the memory stack around the layer, and token elimination where sparse.

``apply_lemo`` converts a decoder layer in place by swapping its class for ``LemoDecoderLayer<Name>`` (the mixin
``LemoDecoderLayerMixin`` before the model's class ``<Name>``, e.g. ``LemoDecoderLayerLlamaDecoderLayer``; see
``lemo_ds.class_swap``) and storing one ``LayerPlan`` on it as ``_lemo``. Nothing else about the module changes: its
parameters and their names (checkpoints, peft adapters and ZeRO-3 partitions are untouched), its hooks, and
``isinstance`` checks (Hugging Face's hidden-state capture and gradient checkpointing still see a decoder layer).
The forward:

1. a dense layer runs the model's layer on every row, inside the memory context;
2. a sparse layer runs the sparse step (``lemo_ds.core.step``) with ``HuggingFaceLayout``: its ``SparsePlan`` picks
   the blocks, the kept rows are gathered with their RoPE cos/sin, position ids, mask and documents
   (``[b, s, *] -> [b, K, *]``), the model's layer (``eliminate: "layer"``, under a kept-rows checkpoint where asked)
   or its attention sublayer (``"attention"``) runs on them inside the memory context, the result is written back
   into the kept rows, and with ``"attention"`` the MLP sublayer then runs on every row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lemo_ds import distributed
from lemo_ds.core.plan import SparsePlan
from lemo_ds.core.step import sparse_step
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
        return raw if memory is None else memory.checkpoint_function(raw, dense=self._lemo.sparse is None)

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
        ratio = sparse.keep_ratio(self.training)  # once per call
        if self._lemo_checkpointing() and not self._lemo_checkpoints_kept_rows(ratio):
            # The whole sparse call under one checkpoint, as Hugging Face would take it: its input is stored, and the
            # recompute takes the forward's selection back by ``key``. hidden_states goes positionally so that
            # reentrant checkpointing sees it as an input.
            kwargs = {name: value for name, value in kwargs.items() if name not in CACHE_KWARGS}
            body = partial(self._lemo_sparse_forward, ratio=ratio, checkpoint_key=object(), **kwargs)
            return self._gradient_checkpointing_func(body, hidden_states)
        return self._lemo_sparse_forward(hidden_states, ratio=ratio, checkpoint_key=None, **kwargs)

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

    def _lemo_checkpoints_kept_rows(self, ratio: float) -> bool:
        """Sparsity-aware checkpointing (``eliminate: "layer"``): instead of checkpointing the whole layer call (which
        stores the whole input [b, s, h] for the recompute), checkpoint only the original layer on the kept rows
        [b, K, h]. The gather and the write-back need nothing stored (their gradients are a scatter and a gather by
        index), so the layer stores K rows instead of s. With ``"attention"`` the MLP needs every row: the whole call
        is checkpointed."""
        config = self._lemo.sparse.config
        return (
            self._lemo_checkpointing()
            and config.memory.sparse_checkpointing
            and config.eliminate == "layer"
            and ratio < 1.0
        )

    def _lemo_sparse_forward(
        self, hidden_states: torch.Tensor, ratio: float, checkpoint_key: object | None, **kwargs: Any
    ) -> torch.Tensor:  # hidden_states [b, s, h]
        """``checkpoint_key``: set when this call is the body of a whole-layer checkpoint (its recompute reuses the
        forward's selection, and its input must stay as it is)."""
        layout = HuggingFaceLayout(
            self, hidden_states, kwargs, kept_rows_checkpoint=self._lemo_checkpoints_kept_rows(ratio),
            whole_call_checkpointed=checkpoint_key is not None,
        )  # fmt: skip
        return sparse_step(self._lemo.sparse, layout, ratio, self.training, checkpointed=checkpoint_key is not None,
                           key=checkpoint_key)  # fmt: skip


@dataclass
class _Kept:
    hidden: torch.Tensor  # [b, K, h]
    kwargs: dict[str, Any]  # the layer's keyword arguments for the kept rows


class HuggingFaceLayout:
    """The Hugging Face decoder layer's side of the sparse step (``lemo_ds.core.step``): [b, s, h] hidden states, RoPE
    cos/sin [b or 1, s, d], a 4D mask [b or 1, 1, s, s] or document keys, position ids; the layer's own forward for
    ``eliminate: "layer"``, its attention and MLP sublayers (the policy names them) for ``"attention"``."""

    def __init__(self, layer: LemoDecoderLayerMixin, hidden: torch.Tensor, kwargs: dict[str, Any],
                 kept_rows_checkpoint: bool, whole_call_checkpointed: bool) -> None:  # fmt: skip
        self.layer, self.hidden, self.kwargs = layer, hidden, kwargs
        self.policy, self.plan = layer._lemo.policy, layer._lemo.sparse
        self.kept_rows_checkpoint = kept_rows_checkpoint
        self.whole_call_checkpointed = whole_call_checkpointed
        self.seq = hidden.shape[1]
        self.shard = sequence_parallel()

    def run_dense(self) -> torch.Tensor:
        return self.layer._lemo_layer(self.hidden, **self.kwargs)

    def refuse_unsupported(self) -> None:
        if cache_argument(self.kwargs) is not None:
            raise LemoInputError(
                "token elimination runs without a KV cache (a cache needs every token of every layer): call the "
                "model with use_cache=False (apply_lemo sets config.use_cache = False; generation is dense unless "
                "lemo.apply_in_eval is true)"
            )

    def scores(self) -> torch.Tensor:  # [b, n]
        plan, kwargs = self.plan, self.kwargs
        context = ScoreContext(
            layer_index=plan.layer_index,
            block_size=plan.config.block_size,
            position_embeddings=kwargs[self.policy.position_embeddings_kwarg],  # cos, sin [b or 1, s, d]
            # Under sequence parallelism the model's mask covers this rank's shard only: the scorer uses it (the
            # per-shard rule, lemo_ds.sequence_parallel), the layer does not (Ulysses attends over all shards).
            attention_mask=kwargs.get(self.policy.mask_kwarg),  # [b or 1, 1, s, s] or None
            policy=self.policy,
            step=plan.controller.step,
            micro_step=plan.controller.micro_step,
            rank=distributed.rank(),
            documents=kwargs.get(DOCUMENTS_KWARG),
        )
        return plan.scorer.score(self.layer, self.hidden.detach(), context)

    def agree(self, blocks: torch.Tensor) -> None:
        """Nothing: every rank of a Hugging Face model holds every head (no tensor parallelism)."""

    def gather(self, rows: torch.Tensor) -> _Kept:  # rows [b, K]
        policy, kwargs = self.policy, self.kwargs
        batch = rows.shape[0]
        cos, sin = kwargs[policy.position_embeddings_kwarg]  # [b or 1, s, d]
        hidden, kept_cos, kept_sin = gather_rows(self.hidden, rows, cos, sin, backend=self.plan.config.kernels)
        kept = dict(kwargs)
        kept[policy.position_embeddings_kwarg] = (kept_cos, kept_sin)  # [b, K, d] each: the true positions
        position_ids = kwargs.get(policy.position_ids_kwarg)  # [b or 1, s]
        if position_ids is not None:
            kept[policy.position_ids_kwarg] = position_ids.expand(batch, -1).gather(1, rows)  # [b, K]
        mask = kwargs.get(policy.mask_kwarg)
        if self.shard is not None:
            kept[policy.mask_kwarg] = None
        elif mask is not None:
            kept[policy.mask_kwarg] = gather_attention_mask(mask, rows)  # [b, 1, K, K]
        documents = kwargs.get(DOCUMENTS_KWARG)
        if documents is not None:  # each document's kept rows are one run again (rows ascend)
            kept[DOCUMENTS_KWARG] = documents.gather(rows)
        if kwargs.get(DOC_KWARG) is not None:  # document keys travel with the kept rows (sequence parallel)
            kept[DOC_KWARG] = kwargs[DOC_KWARG].expand(batch, -1).gather(1, rows)  # [b, K]
        return _Kept(hidden, kept)

    def run_layer(self, kept: _Kept) -> torch.Tensor:  # [b, K, h]
        forward = partial(self.layer._lemo_layer, **kept.kwargs)
        out = self.layer._gradient_checkpointing_func(forward, kept.hidden) if self.kept_rows_checkpoint else (
            forward(kept.hidden))  # fmt: skip
        return out[0] if isinstance(out, tuple) else out  # families that still return (hidden_states, ...)

    def run_attention(self, kept: _Kept) -> torch.Tensor:  # [b, K, h]: h_K + attention(norm(h_K))
        layer, policy = self.layer, self.policy
        with self._memory_context():
            attention_out = policy.attention(layer)(hidden_states=policy.input_norm(layer)(kept.hidden), **kept.kwargs)
            return kept.hidden + attention_out[0]

    def may_overwrite_input(self) -> bool:
        return not self.whole_call_checkpointed  # a whole-call checkpoint keeps our input for the recompute

    def write_back(self, kept_out: torch.Tensor, rows: torch.Tensor, inplace: bool) -> torch.Tensor:
        return write_back_rows(self.hidden, kept_out, rows, inplace=inplace, backend=self.plan.config.kernels)

    def run_mlp(self, hidden: torch.Tensor) -> torch.Tensor:  # [b, s, h]: h + mlp(norm(h)) on every row
        layer, policy = self.layer, self.policy
        with self._memory_context():
            return hidden + policy.mlp(layer)(policy.post_attention_norm(layer)(hidden))

    def _memory_context(self):
        memory = self.layer._lemo.memory
        return memory.context() if memory is not None else contextlib.nullcontext()


def is_sparse_layer(layer: nn.Module) -> bool:
    return isinstance(layer, LemoDecoderLayerMixin) and layer._lemo.sparse is not None
