"""The sparse Megatron-core transformer layer: score blocks, gather the kept tokens, run the layer, write back.

``LemoTransformerLayer`` is Megatron-core's ``TransformerLayer`` with token elimination in front
(``lemo_layer_class`` makes the same for any ``TransformerLayer`` subclass a spec names). The sparse step is the
core's (``lemo_ds.core.step``, with ``SparsePlan`` choosing the blocks), shared with the Hugging Face layer; this
module is its layout, ``MegatronLayout``: the stock forward on the kept rows for ``eliminate: "layer"``, the stock
``_forward_attention`` on the kept rows and ``_forward_mlp`` on every row for ``"attention"``. Its submodules, their
parameters and their names are the stock layer's, so checkpoints, optimizers and distributed wrappers see an
ordinary layer. Megatron's conventions and how each is honoured:

- Hidden states are ``[s, b, h]``, sequence first. The kept rows are gathered through the flat ``[s * b, h]`` view
  (row ``r`` of sample ``i`` is flat row ``r * b + i``), so the kept tokens come out as a contiguous ``[K, b, h]``
  in one gather, with no transpose copy, and are written back the same way.
- RoPE arrives as angles, ``rotary_pos_emb`` ``[s, 1, 1, d]`` (or a (query, key) pair of them). Gathering a
  sample's kept rows makes the angles per sample, ``[K, b, 1, d]``. Megatron-core 0.16's unfused RoPE
  (``_apply_rotary_pos_emb_bshd``: ``t * cos(freqs) + rotate_half(t) * sin(freqs)``) broadcasts that against
  ``[K, b, heads, d]``, so the layer runs once for the whole batch. Transformer Engine's fused RoPE
  (``apply_rope_fusion``, ``fused_single_qkv_rope``) checks ``freqs.size(1) == 1`` (one table shared by the
  batch), and its packed-sequence kernel restarts positions at every sequence; so when the gathered angles are
  per sample (b > 1) or per token (packed), the layer's call runs with those two flags off (unfused RoPE, exact
  positions). With b == 1 and no packing the fused kernel takes the gathered ``[K, 1, 1, d]`` as it is.
- Attention masks are bool, True = masked out, ``[b or 1, 1, s or 1, s]``: restricted to the kept rows and
  columns. No mask means causal (the attention's ``attn_mask_type``), which the kept tokens, in ascending order,
  keep without a mask.
- Packed sequences (``PackedSeqParams``, ``qkv_format="thd"``, hidden ``[t, 1, h]``): blocks are scored and kept
  over the whole packed row; every document keeps its kept tokens in order, documents left with no kept token
  are dropped, and ``cu_seqlens`` / ``max_seqlen`` are recomputed. A kept token keeps the RoPE angle of its true
  position: the position Megatron's THD RoPE would have given it (its offset in its document, or its row when
  the angle table covers the whole pack), passed as a per-token table that Megatron applies by exact mapping.
- Activation checkpointing (``recompute_granularity="full"``): the forward runs inside Megatron's
  ``CheckpointFunction`` under ``no_grad``, and its recompute inside the backward. The selection made in the
  forward is queued per layer and the recompute takes it back in order (Megatron's schedules run the backward
  passes of micro-batches in the order of their forwards), so both run on the same tokens whatever the scorer.
- Tensor parallelism: each rank holds some of the heads; the oracle scorer all-gathers the queries and keys of
  every head over the tensor-parallel group, and the selection is broadcast from the group's first rank, so all
  ranks of a layer keep the same tokens.
  Sequence parallelism and context parallelism are refused (the sequence is split across ranks there).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from lemo_ds import class_swap, distributed
from lemo_ds.controller import LemoController
from lemo_ds.core.plan import SparsePlan, in_backward
from lemo_ds.core.step import sparse_step
from lemo_ds.errors import LemoConfigError, LemoInputError
from lemo_ds.kernels import gather_rows, write_back_rows
from lemo_ds.scorers import build_scorer
from lemo_ds.scorers.base import ScoreContext

# Keyword arguments of TransformerLayer.forward a sparse layer cannot honour on a subset of tokens.
_REFUSED_KWARGS = {
    "inference_context": "token elimination runs without a KV cache; run inference and generation dense",
    "inference_params": "token elimination runs without a KV cache; run inference and generation dense",
    "context": "cross-attention is not supported by the sparse layer",
    "attention_bias": "an attention bias is not supported by the sparse layer",
    "rotary_pos_cos": "precomputed RoPE cos/sin (inference only) are not supported; pass rotary_pos_emb",
    "rotary_pos_sin": "precomputed RoPE cos/sin (inference only) are not supported; pass rotary_pos_emb",
    "rotary_pos_cos_sin": "precomputed RoPE cos/sin (inference only) are not supported; pass rotary_pos_emb",
    "sequence_len_offset": "a sequence offset (inference only) is not supported",
}


class LemoTransformerLayerMixin:
    """Placed before a Megatron-core ``TransformerLayer`` class in the MRO of the sparse layer's class."""

    _lemo: SparsePlan

    def __init__(self, *args: Any, lemo_controller: LemoController, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        if getattr(config, "multi_latent_attention", False):
            raise LemoConfigError("lemo_ds.megatron: multi-latent attention is not supported by the sparse layer")
        if config.sequence_parallel:
            raise LemoConfigError(
                "lemo_ds.megatron: sequence_parallel splits the sequence across tensor-parallel ranks, which the "
                "sparse layer does not support; turn sequence_parallel off"
            )
        if config.context_parallel_size > 1:
            raise LemoConfigError("lemo_ds.megatron: context parallelism is not supported by the sparse layer")
        index = self.layer_number - 1
        if not 0 <= index < len(lemo_controller.target_ratios):
            raise LemoConfigError(
                f"lemo_ds.megatron: layer {self.layer_number} is outside the {len(lemo_controller.target_ratios)} "
                "layers the lemo spec was made for; pass the model's num_layers to the spec function"
            )
        lemo = lemo_controller.config
        if lemo.scorer == "predictor":  # predictors are trained on, and read, Hugging Face layers
            raise LemoConfigError(
                'lemo.scorer: "predictor" is not available for Megatron layers; use "oracle", "random" or "norm"'
            )
        self._lemo = SparsePlan(index, lemo_controller, build_scorer(lemo))

    # ---- forward ---------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if len(args) > 1:
            raise TypeError(
                f"{type(self).__name__}: pass everything after hidden_states as keyword arguments "
                "(as Megatron's TransformerBlock does)"
            )
        hidden_states = args[0] if args else kwargs.pop("hidden_states")  # [s, b, h] or [t, 1, h] (packed)
        plan = self._lemo
        layout = MegatronLayout(self, hidden_states, kwargs)
        # Megatron's CheckpointFunction runs the forward under no_grad and the recompute inside the backward; it owns
        # the checkpoint, so the recompute takes the oldest selection back (no key).
        full_recompute = self.training and self.config.recompute_granularity == "full"
        out = sparse_step(plan, layout, plan.keep_ratio(self.training), self.training,
                          checkpointed=full_recompute and (in_backward() or not torch.is_grad_enabled()))  # fmt: skip
        if isinstance(out, tuple):  # run_dense: the stock layer's (output, context)
            return out
        # Megatron's pipeline schedules free stage outputs and insist they are not views.
        return make_viewless_tensor(out, requires_grad=True, keep_graph=True), layout.context

    def _lemo_stock_forward(self, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The stock layer's forward (``TransformerLayer.forward`` or the spec's subclass)."""
        return super().forward(**kwargs)

    def _lemo_agree(self, blocks: torch.Tensor) -> None:
        """One selection for every tensor-parallel rank of the layer: the group's first rank's, in place."""
        tp_group = self.pg_collection.tp
        if tp_group is not None and tp_group.size() > 1:
            torch.distributed.broadcast(blocks, src=torch.distributed.get_global_rank(tp_group, 0), group=tp_group)

    @contextlib.contextmanager
    def _rope_for_gathered_angles(self, per_sample: bool):
        """Unfused RoPE for this call when the gathered angles are per sample or per token: Transformer Engine's
        fused kernels take one [s, 1, 1, d] table shared by the batch (and restart positions per packed
        sequence). The flags live on the config shared by every layer, so they are restored on the way out."""
        config = self.config
        fused = {name: True for name in ("apply_rope_fusion", "fused_single_qkv_rope") if getattr(config, name, False)}
        if not per_sample or not fused:
            yield
            return
        for name in fused:
            setattr(config, name, False)
        try:
            yield
        finally:
            for name, value in fused.items():
                setattr(config, name, value)

    def _lemo_query_key(self, hidden_states: torch.Tensor, rotary: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's queries [b, H, s, d] and keys [b, KV, s, d] after RoPE, as its attention makes them, from the
        layer input [s, b, h]."""
        attention = self.self_attention
        normed = self.input_layernorm(hidden_states)  # [s, b, h]
        query, key = attention.get_query_key_value_tensors(normed, None)[:2]  # [s, b, H, d], [s, b, KV, d]
        if rotary is not None:
            q_angles, k_angles = rotary if isinstance(rotary, tuple) else (rotary, rotary)
            mscale = _yarn_get_concentration_factor_from_config(self.config)
            cp_group = self.pg_collection.cp
            if q_angles is not None:
                query = apply_rotary_pos_emb(query, q_angles, config=self.config, mscale=mscale, cp_group=cp_group)
            if k_angles is not None:
                key = apply_rotary_pos_emb(key, k_angles, config=self.config, mscale=mscale, cp_group=cp_group)
        tp_group = self.pg_collection.tp
        if tp_group is not None and tp_group.size() > 1:
            # Each rank holds a contiguous slice of the heads (and of the key groups): the oracle needs all of them
            # (the tile max of the head average is not a sum of per-rank maxima).
            query, key = _all_heads(query, tp_group), _all_heads(key, tp_group)
        return query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3)


class MegatronQueryKeys:
    """The policy the oracle scorer asks for a Megatron layer's queries and keys (``query_key_states``), so that one
    oracle adapter (``lemo_ds.scorers.oracle``) serves both layer kinds."""

    @staticmethod
    def query_key_states(layer: LemoTransformerLayerMixin, hidden_states: torch.Tensor,
                         rotary: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return layer._lemo_query_key(hidden_states.transpose(0, 1), rotary)  # hidden_states [b, s, h]


@dataclass
class _Kept:
    hidden: torch.Tensor  # [K, b, h]
    kwargs: dict[str, Any]
    flat_rows: torch.Tensor  # [1, K * b]: the kept rows in the flat [s * b, h] view
    per_sample_angles: bool


class MegatronLayout:
    """The Megatron-core layer's side of the sparse step (``lemo_ds.core.step``): hidden states [s, b, h] (packed:
    [t, 1, h] with PackedSeqParams), RoPE angles, bool masks (True = masked out); the stock forward for
    ``eliminate: "layer"``, ``_forward_attention`` and ``_forward_mlp`` for ``"attention"``."""

    def __init__(self, layer: LemoTransformerLayerMixin, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        self.layer, self.hidden, self.kwargs = layer, hidden, kwargs
        self.plan = layer._lemo
        self.seq, self.batch, self.width = hidden.shape
        self.shard = None  # Megatron's sequence and context parallelism are refused at construction
        self.mask: torch.Tensor | None = kwargs.get("attention_mask")  # bool, True = masked out
        self.rotary = kwargs.get("rotary_pos_emb")  # [s, 1, 1, d] angles, a (query, key) pair of them, or None
        packed: PackedSeqParams | None = kwargs.get("packed_seq_params")
        self.docs = _Documents.of(packed, hidden) if packed is not None else None
        self.context = None  # the stock forward's second output (cross-attention context)
        # Row r of sample i is row r * b + i of the flat [s * b, h] view: one gather yields [K, b, h] contiguous.
        self.flat = hidden.reshape(1, self.seq * self.batch, self.width)  # [1, s*b, h]; a view of a contiguous input

    def run_dense(self) -> tuple[torch.Tensor, Any]:
        return self.layer._lemo_stock_forward(hidden_states=self.hidden, **self.kwargs)

    def refuse_unsupported(self) -> None:
        for name, reason in _REFUSED_KWARGS.items():
            if self.kwargs.get(name) is not None:
                raise LemoInputError(f"{type(self.layer).__name__} (layer {self.layer.layer_number}): {reason}")
        if self.docs is not None:
            if self.batch != 1:
                raise LemoInputError(f"packed (thd) hidden states must be [t, 1, h], got {tuple(self.hidden.shape)}")
            if self.mask is not None:
                raise LemoInputError("pass either packed_seq_params or an attention_mask to a sparse layer, not both")
            # Angles of each token's true position, [t, 1, 1, d]: the scorer's RoPE and the gather take these.
            self.rotary = _map_rotary(self.rotary, self.docs.token_angles)

    def scores(self) -> torch.Tensor:  # [b, n]
        plan = self.plan
        allowed = None
        if self.mask is not None:  # the oracle's allowed pairs: True = attend, [b, 1, s, s]
            allowed = ~self.mask.expand(self.batch, 1, self.seq, self.seq)
        context = ScoreContext(
            layer_index=plan.layer_index,
            block_size=plan.config.block_size,
            position_embeddings=self.rotary,  # what MegatronQueryKeys hands to the layer's own RoPE
            attention_mask=allowed,
            policy=MegatronQueryKeys,
            step=plan.controller.step,
            micro_step=plan.controller.micro_step,
            rank=distributed.rank(),
            documents=self.docs,
        )
        return plan.scorer.score(self.layer, self.hidden.detach().transpose(0, 1), context)  # scorers read [b, s, h]

    def agree(self, blocks: torch.Tensor) -> None:
        self.layer._lemo_agree(blocks)

    def gather(self, rows: torch.Tensor) -> _Kept:  # rows [b, K] ascending
        batch, kept = rows.shape
        flat_rows = (rows.t() * batch + torch.arange(batch, device=rows.device)).reshape(1, kept * batch)  # [1, K*b]
        hidden = gather_rows(self.flat, flat_rows, backend=self.plan.config.kernels)[0].view(kept, batch, self.width)
        kwargs = dict(self.kwargs)
        kwargs["rotary_pos_emb"] = _map_rotary(self.rotary, lambda table: _gather_angles(table, rows, self.seq))
        if self.mask is not None:
            kwargs["attention_mask"] = _gather_mask(self.mask, rows, self.seq)  # [b, 1, K or 1, K]
        if self.kwargs.get("padding_mask") is not None:  # [b, s], MoE routing
            kwargs["padding_mask"] = self.kwargs["padding_mask"].gather(1, rows)  # [b, K]
        if self.docs is not None:
            kwargs["packed_seq_params"] = self.docs.kept_params(rows[0])
        return _Kept(hidden, kwargs, flat_rows, per_sample_angles=batch > 1 or self.docs is not None)

    def run_layer(self, kept: _Kept) -> torch.Tensor:  # [K, b, h]
        with self.layer._rope_for_gathered_angles(kept.per_sample_angles):
            out, self.context = self.layer._lemo_stock_forward(hidden_states=kept.hidden, **kept.kwargs)
        return out

    def run_attention(self, kept: _Kept) -> torch.Tensor:  # [K, b, h]: the kept rows after attention + residual
        with self.layer._rope_for_gathered_angles(kept.per_sample_angles):
            out, self.context = self.layer._forward_attention(hidden_states=kept.hidden, **kept.kwargs)
        return out

    def may_overwrite_input(self) -> bool:
        return (
            self.layer.config.recompute_granularity != "full"  # the checkpoint keeps our input for the recompute
            and not (self.hidden.is_leaf and self.hidden.requires_grad)  # a pipeline stage's received input
            and self.flat._base is not None  # flat is a view of hidden_states, not a copy
        )

    def write_back(self, kept_out: torch.Tensor, rows: torch.Tensor, inplace: bool) -> torch.Tensor:  # [s, b, h]
        batch, kept = rows.shape
        flat_rows = (rows.t() * batch + torch.arange(batch, device=rows.device)).reshape(1, kept * batch)
        kept_flat = kept_out.reshape(1, kept * batch, self.width)  # row j * b + i = kept row j of sample i
        out = write_back_rows(self.flat, kept_flat, flat_rows, inplace=inplace, backend=self.plan.config.kernels)
        return out.view(self.seq, batch, self.width)

    def run_mlp(self, hidden: torch.Tensor) -> torch.Tensor:  # [s, b, h]
        return self.layer._forward_mlp(hidden, None, padding_mask=self.kwargs.get("padding_mask"))


class LemoTransformerLayer(LemoTransformerLayerMixin, TransformerLayer):
    """Megatron-core's TransformerLayer with LeMo token elimination (see the module docstring)."""


class_swap.register(LemoTransformerLayerMixin, TransformerLayer, LemoTransformerLayer)


def lemo_layer_class(layer_class: type[TransformerLayer]) -> type[TransformerLayer]:
    """The sparse class of a TransformerLayer (sub)class a spec names: ``LemoTransformerLayer`` for the stock one,
    ``LemoTransformerLayer<Name>`` for a subclass (``lemo_ds.class_swap.mixed_class``)."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, TransformerLayer)):
        raise LemoConfigError(
            f"lemo_ds.megatron: the layer spec's module must be a megatron.core TransformerLayer (sub)class, got "
            f"{layer_class!r}"
        )
    if issubclass(layer_class, LemoTransformerLayerMixin):
        return layer_class
    return class_swap.mixed_class(LemoTransformerLayerMixin, layer_class)


# ---- gathers ---------------------------------------------------------------------------------------------------


def _all_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[s, b, heads / tp, d] on each tensor-parallel rank -> [s, b, heads, d] in the global head order."""
    parts = [torch.empty_like(x) for _ in range(group.size())]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=2)


def _map_rotary(rotary: Any, fn) -> Any:
    """Apply ``fn`` to the angle table(s) of ``rotary_pos_emb``: a tensor, a (query, key) pair, or None."""
    if rotary is None:
        return None
    if isinstance(rotary, tuple):
        return tuple(None if table is None else fn(table) for table in rotary)
    return fn(rotary)


def _gather_angles(table: torch.Tensor, rows: torch.Tensor, seq: int) -> torch.Tensor:
    """RoPE angles of the kept rows: table [>= s, 1 or b, 1, d], rows [b, K] -> [K, b, 1, d] (per sample)."""
    batch, kept = rows.shape
    angles = table[:seq, :, 0, :]  # [s, 1 or b, d]
    angles = angles.expand(seq, batch, angles.shape[-1])  # [s, b, d]
    index = rows.t()[:, :, None].expand(kept, batch, angles.shape[-1])  # [K, b, d]
    return angles.gather(0, index).unsqueeze(2)  # [K, b, 1, d]


def _gather_mask(mask: torch.Tensor, rows: torch.Tensor, seq: int) -> torch.Tensor:
    """A bool mask [b or 1, 1, s or 1, s] restricted to the kept rows [b, K] (queries and keys)."""
    batch, kept = rows.shape
    out = mask.expand(batch, *mask.shape[1:])  # [b, 1, s or 1, s]
    if out.shape[2] == seq:  # a [.., 1, s] key-padding mask has no query dimension to gather
        out = out.gather(2, rows[:, None, :, None].expand(batch, out.shape[1], kept, out.shape[3]))
    return out.gather(3, rows[:, None, None, :].expand(batch, out.shape[1], out.shape[2], kept))


@dataclass
class _Documents:
    """The documents of a packed (thd) row of t tokens."""

    params: PackedSeqParams
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32
    ids: torch.Tensor  # [t] int64: the document of every token

    @classmethod
    def of(cls, params: PackedSeqParams, hidden_states: torch.Tensor) -> _Documents:
        if params.qkv_format != "thd":
            raise LemoInputError(
                f"packed_seq_params with qkv_format={params.qkv_format!r}: the sparse layer supports packed "
                "sequences in the 'thd' format only"
            )
        cu = params.cu_seqlens_q
        for name in ("cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            other = getattr(params, name)
            if other is not None and not torch.equal(other, cu):
                raise LemoInputError(
                    f"packed_seq_params.{name} differs from cu_seqlens_q; the sparse layer supports self-attention "
                    "over unpadded packed documents only"
                )
        tokens = hidden_states.shape[0]
        if int(cu[-1]) != tokens:
            raise LemoInputError(f"cu_seqlens_q ends at {int(cu[-1])} but the packed row has {tokens} tokens")
        positions = torch.arange(tokens, device=cu.device)
        ids = torch.searchsorted(cu[1:].long(), positions, right=True)  # [t]
        return cls(params, cu, ids)

    def doc_ids(self) -> torch.Tensor:
        """The oracle kernel's document ids [1, t] (``ScoreContext.doc_ids``)."""
        return self.ids[None]

    def token_angles(self, table: torch.Tensor) -> torch.Tensor:
        """Each token's RoPE angles [t, 1, 1, d], at the position Megatron's THD RoPE gives it: its offset in its
        document, or its row when the table has one entry per token of the pack (Megatron's exact mapping)."""
        tokens = self.ids.shape[0]
        rows = torch.arange(tokens, device=self.ids.device)
        positions = rows if table.shape[0] == tokens else rows - self.cu_seqlens.long()[self.ids]
        return table[positions]

    def kept_params(self, rows: torch.Tensor) -> PackedSeqParams:
        """PackedSeqParams of the kept tokens (rows [K], ascending): each document's kept tokens, empty documents
        dropped (a zero-length sequence is no sequence), lengths recomputed. Megatron then applies the per-token
        angle table by exact mapping, as its size equals the new cu_seqlens[-1]."""
        counts = torch.bincount(self.ids[rows], minlength=self.cu_seqlens.shape[0] - 1)  # [n_docs]
        counts = counts[counts > 0]
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)  # [n_kept_docs + 1]
        longest = int(counts.max())
        return dataclasses.replace(
            self.params,
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=None,
            cu_seqlens_kv_padded=None,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
