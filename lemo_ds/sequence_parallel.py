"""Ulysses sequence parallelism (DeepSpeed's ``UlyssesSPAttentionHF``) combined with token elimination.

Each rank of a sequence-parallel (SP) group holds a contiguous shard ``[b, s / sp, h]`` of every sequence.
DeepSpeed's Ulysses attention swaps sequence shards for head shards with an all-to-all, attends over the whole
sequence, and swaps back. Token elimination composes with it as follows (the per-shard rule, also in the README):

- Selection is per shard. A sparse layer on SP rank ``r`` scores the ``n_l = s / (sp * B)`` blocks of its own
  shard and keeps ``k = max(min_blocks, forced, round(r_l * n_l))`` of them: the keep ratio applies to each shard,
  so every rank keeps the same number of tokens and Ulysses' all-to-all splits stay equal. ``always_keep_blocks``
  are GLOBAL block indices (block 0 is the first block of the whole sequence, the attention sink); the rank
  whose shard holds one keeps it, and ``forced`` is the largest number of them in any shard, so ``k`` is equal
  on every rank. The sequence must split into whole blocks on every rank (``s % (sp * B) == 0``), so there is no
  partial tail block.
- Scorers see only the shard: ``norm``, ``random`` and ``predictor`` are local by nature; the ``oracle`` scores a
  key block of the shard by the queries of the same shard (causal, same document), i.e. LeMo's column sum
  restricted to the shard's rows. Queries of later shards are not looked at (that would need their queries on
  this rank: a full-size exchange per layer, which is what sequence parallelism avoids).
- Kept rows travel with their true positions: RoPE cos/sin and ``position_ids`` are gathered at the kept rows
  before the layer runs, and the all-to-all of Ulysses concatenates the kept rows of the ranks in rank order,
  which is ascending global position. Attention over that concatenation is causal by index, and documents
  of packed sequences are kept apart by a per-token document key (the global row of the document's first
  token, ``lemo_sp_doc_start``) that travels beside the tokens (see ``_doc_aware_sdpa``).
- Loss: labels are shifted before sharding (``UlyssesSPDataLoaderAdapter`` makes ``shift_labels``); rank ``r``
  back-propagates ``sum_r / N`` with ``N`` the counted tokens of the whole SP group, so the gradient summed over
  the group is that of the token-weighted mean, and ZeRO's reduction (which divides by the data-parallel size
  only, DeepSpeed's SP convention) averages it over the data-parallel groups. The reported loss is the SP-group
  sum of those terms: the token-weighted mean over the ranks.

Data parallel and sequence parallel groups compose as in DeepSpeed: consecutive ranks form an SP group
(``parallel_state_sp``), world = dp x sp, ZeRO partitions over all ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lemo_ds.document_attention import document_attention
from lemo_ds.documents import Documents
from lemo_ds.errors import LemoConfigError, LemoInputError
from lemo_ds.memory.segment_loss import IGNORE_INDEX

DOC_KWARG = "lemo_sp_doc_start"


@dataclass(frozen=True)
class SequenceParallel:
    """The SP group of this rank (``sp`` ranks holding shards of the same sequences)."""

    size: int
    rank: int  # rank within the SP group
    group: Any  # torch.distributed ProcessGroup
    dp_size: int
    dp_rank: int
    mpu: Any  # DeepSpeed's parallel_state_sp module, for deepspeed.initialize(mpu=...)


_ACTIVE: SequenceParallel | None = None


def active() -> SequenceParallel | None:
    """The SP state of this process when sequence parallelism is on (size > 1), else None."""
    return _ACTIVE


# ---- checks (local, before any collective) -----------------------------------------------------------------


def check_loss_tokens(lemo: Any, sp: int) -> None:
    """The loss over processed positions (the "lemo" section's default) is refused under sequence parallelism: each
    shard would divide by its own count of processed positions, a mean of means, not the group's mean."""
    if sp > 1 and lemo is not None and lemo.enabled and lemo.loss_tokens == "processed":
        default = "" if "loss_tokens" in lemo.model_fields_set else " (the default)"
        raise LemoConfigError(
            f'lemo.loss_tokens "processed"{default} is not supported with sequence parallelism '
            f'(sequence_parallel_size {sp}) yet; set "loss_tokens": "all" in the "lemo" section '
            "(ds_configs/zero3_lemo_sp.json sets LeMo's rule) or sequence_parallel_size 1"
        )


def sp_size_from_config(ds_config: dict[str, Any]) -> int:
    """DeepSpeed's own key ``sequence_parallel_size`` (1 when absent)."""
    value = ds_config.get("sequence_parallel_size", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LemoConfigError(f"sequence_parallel_size must be a positive integer (got {value!r})")
    return value


def check_dims(
    *, sp: int, world_size: int, seq_len: int, block_size: int | None, heads: int, kv_heads: int
) -> None:
    """Every parallel dimension that must divide, checked from numbers alone so that every rank reaches the same
    verdict before any collective. ``block_size`` None: no token elimination."""
    if sp == 1:
        return
    if world_size % sp:
        raise LemoConfigError(
            f"sequence_parallel_size {sp} does not divide the world size {world_size}; use a world size that is "
            f"a multiple of {sp} (data parallel x sequence parallel)"
        )
    if seq_len % sp:
        raise LemoConfigError(
            f"sequence length {seq_len} does not divide by sequence_parallel_size {sp}; every rank needs a shard "
            f"of equal length: use a multiple of {sp}"
        )
    if block_size is not None and seq_len % (sp * block_size):
        raise LemoConfigError(
            f"sequence length {seq_len} does not split into whole lemo blocks on each of the {sp} sequence-parallel "
            f"ranks (block_size {block_size}): it must be a multiple of sequence_parallel_size x block_size = "
            f"{sp * block_size}, e.g. {max(1, round(seq_len / (sp * block_size))) * sp * block_size}"
        )
    if heads % sp:
        raise LemoConfigError(f"the model's {heads} attention heads do not divide by sequence_parallel_size {sp}")
    if kv_heads % sp and sp % kv_heads:
        raise LemoConfigError(
            f"the model's {kv_heads} key/value heads and sequence_parallel_size {sp}: one must divide the other"
        )


# ---- setup ---------------------------------------------------------------------------------------------------


def setup(model: nn.Module, sp: int, micro_batch: int) -> SequenceParallel | None:
    """Turn Ulysses SP on for ``model`` (a Hugging Face causal LM, possibly peft-wrapped, before
    ``deepspeed.initialize``): DeepSpeed's SP groups, its attention wrapper around a document-aware SDPA, and a
    hook that gives every decoder layer the document key of its tokens. Returns the SP state (pass ``.mpu`` to
    ``deepspeed.initialize``), or None when ``sp == 1``. Call once per process, after distributed init."""
    global _ACTIVE
    if sp == 1:
        return None
    if _ACTIVE is not None:
        raise LemoConfigError("sequence parallelism is already set up in this process")
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lemo_ds.policies import policy_for, unwrap_model

    base = unwrap_model(model)
    attention = getattr(base.config, "_attn_implementation", None)
    if attention != "sdpa":
        raise LemoConfigError(f'sequence parallelism needs attn_implementation "sdpa" (the model uses {attention!r})')
    # DeepSpeed wraps whatever ALL_ATTENTION_FUNCTIONS["sdpa"] is at registration time as its core attention:
    # install the document-aware SDPA first, so Ulysses calls it on the gathered sequence.
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _doc_aware_sdpa(original)
    # seq_length_is_variable: a sparse layer attends over k kept rows per rank, not the whole shard, so the
    # length Ulysses sees changes from layer to layer.
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=base,
        core_attn_implementation="sdpa",
        sequence_parallel_size=sp,
        micro_batch_size=micro_batch,
        seq_length_is_variable=True,
    )
    world = dist.get_world_size()
    _ACTIVE = SequenceParallel(
        size=sp,
        rank=mpu.get_sequence_parallel_rank(),
        group=mpu.get_sequence_parallel_group(),
        dp_size=world // sp,
        dp_rank=dist.get_rank() // sp,  # parallel_state_sp: SP groups are runs of consecutive ranks
        mpu=mpu,
    )
    decoder = policy_for(base).decoder_model(base)
    decoder.register_forward_pre_hook(_add_document_key, with_kwargs=True)
    return _ACTIVE


def _add_document_key(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the decoder model: ``lemo_sp_doc_start`` [b or 1, s_l], the global row where each
    token's document starts (global row - position id: position ids restart at 0 at every document), which the
    decoder passes to every layer and every layer to its attention."""
    state = active()
    position_ids = kwargs.get("position_ids")  # [b or 1, s_l]
    if position_ids is None:
        raise LemoInputError(
            "sequence parallelism needs position_ids in every forward (global positions of this rank's shard, "
            "as UlyssesSPDataLoaderAdapter provides them)"
        )
    local = position_ids.shape[-1]
    rows = state.rank * local + torch.arange(local, device=position_ids.device)  # [s_l] global rows
    kwargs[DOC_KWARG] = rows - position_ids  # [b or 1, s_l]
    return args, kwargs


def _doc_aware_sdpa(sdpa):
    """Core attention for Ulysses: Hugging Face's SDPA over the gathered sequence, with packed documents kept
    apart. DeepSpeed's wrapper drops the model's mask (it was made for one shard) and relies on causality by
    index, which is right for one document per row: then this calls SDPA with no mask (is_causal, the fast
    kernels). When the gathered document keys say the row is packed, it builds the mask causal & same document;
    the gathered rows are in ascending global order, so causal by index is causal by position."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        # query [b, H_l, S, d], key/value [b, KV_l, S, d]: S = kept rows of all SP ranks, in rank order
        doc = kwargs.pop(DOC_KWARG, None)  # [b or 1, S / sp]: this rank's rows only
        state = active()
        if state is None:
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        if doc is None:
            raise LemoInputError(
                "lemo_ds sequence parallelism: an attention call without document keys; call the model through "
                "its decoder (the hook installed by lemo_ds.sequence_parallel.setup adds them)"
            )
        parts = [torch.empty_like(doc) for _ in range(state.size)]
        dist.all_gather(parts, doc.contiguous(), group=state.group)
        doc = torch.cat(parts, dim=-1)  # [b or 1, S]
        if bool((doc != doc[..., :1]).any()):  # packed: causal within each document, no [S, S] mask
            documents = Documents(doc.expand(query.shape[0], -1).to(torch.int32).contiguous())  # [b, S]
            return document_attention(module, query, key, value, documents, *args, **kwargs)
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


# ---- data ------------------------------------------------------------------------------------------------------


def rank_batches(
    rows: Iterable, state: SequenceParallel, micro_batch: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's shards of the micro-batches, through DeepSpeed's ``UlyssesSPDataLoaderAdapter``.

    Micro-step ``m`` of SP group ``g`` trains rows ``[(m * dp + g) * mb, ... + mb)`` of the row stream (so
    a step consumes ``dp * mb * grad_accum`` rows, whatever sp is, and a resumed run continues exactly). The
    adapter reads one micro-batch per SP rank and hands each in turn to the whole group, sharded: SP rank ``i``
    therefore reads the micro-steps ``m = j * sp + i``. The adapter shifts the labels before sharding
    (``shift_labels``) and drops ``labels``."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    loader = _ReadsOfSpRank(rows, state, micro_batch)
    return iter(UlyssesSPDataLoaderAdapter(loader, state.rank, state.group, state.size, device))


class _ReadsOfSpRank:
    """The micro-batches SP rank ``i`` of group ``g`` reads (see ``rank_batches``): an endless iterable."""

    def __init__(self, rows: Iterable, state: SequenceParallel, micro_batch: int) -> None:
        self.rows, self.state, self.micro_batch = iter(rows), state, micro_batch

    def __len__(self) -> int:  # the adapter's __len__ asks; the stream is endless
        return 1 << 62

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import numpy as np

        state, mb = self.state, self.micro_batch
        per_step = state.dp_size * mb
        for m in count():
            chunk = list(islice(self.rows, per_step))
            if len(chunk) < per_step:
                return
            if m % state.size != state.rank:
                continue
            mine = chunk[state.dp_rank * mb : (state.dp_rank + 1) * mb]
            yield {
                "input_ids": torch.from_numpy(np.stack([r.input_ids for r in mine])),  # [b, s]
                "labels": torch.from_numpy(np.stack([r.labels for r in mine])),  # [b, s]
                "position_ids": torch.from_numpy(np.stack([r.position_ids for r in mine])),  # [b, s]
            }


# ---- loss ------------------------------------------------------------------------------------------------------


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], state: SequenceParallel):
    """Forward of one SP shard; returns (loss to back-propagate, the SP group's token-weighted mean loss).

    ``batch``: input_ids, position_ids and shift_labels of this rank's shard [b, s_l]. The model's loss is
    ``sum over this shard / N`` with ``N`` the counted tokens of the whole group (``num_items_in_batch``); the
    SP-group sum of those is the mean over all tokens of the sequence."""
    shift = batch["shift_labels"]  # [b, s_l], already shifted before sharding
    tokens = (shift != IGNORE_INDEX).sum().to(torch.float32).reshape(1)
    dist.all_reduce(tokens, group=state.group)
    tokens.clamp_min_(1.0)  # no counted label in the whole row: loss 0 (as 0 / 1), not a division by zero
    inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
    # labels=shift_labels only makes Hugging Face's forward compute a loss: given shift_labels, its loss (and
    # lemo_ds's segment loss) uses them as they are, without shifting again.
    loss = model(**inputs, labels=shift, shift_labels=shift, num_items_in_batch=tokens[0]).loss
    reported = loss.detach().clone().reshape(1)
    dist.all_reduce(reported, group=state.group)
    return loss * gradient_factor(model, state), reported[0]


def gradient_factor(engine: Any, state: SequenceParallel) -> float:
    """What rank r's loss term ``sum_r / N`` is multiplied by before backward, so that DeepSpeed's gradient
    reduction yields the gradient of the token-weighted mean, averaged over data-parallel groups.

    DeepSpeed 0.19 is not uniform here: ZeRO-3's reduce-scatter path (``reduce_scatter: true``, the default;
    ``reduce_scatter_coalesced``) divides the summed gradients by the whole world (dp x sp), which matches its ALST
    recipe where every SP rank back-propagates the group's loss through a differentiable all-gather (sp copies);
    ZeRO-1/2 and the data-parallel all-reduce divide by dp = world / sp. So: sp under ZeRO-3, 1 otherwise (and
    ``check_zero_config`` refuses ZeRO-3 without reduce_scatter, whose path depends on bucket sizes)."""
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    return float(state.size) if stage == 3 else 1.0


def check_zero_config(ds_config: dict[str, Any], sp: int) -> None:
    """ZeRO settings whose gradient reduction under sequence parallelism is known (see gradient_factor)."""
    zero = ds_config.get("zero_optimization", {}) or {}
    if sp > 1 and zero.get("stage", 0) == 3 and zero.get("reduce_scatter", True) is False:
        raise LemoConfigError(
            "sequence parallelism with ZeRO-3 needs zero_optimization.reduce_scatter true (the default): with it "
            "off, DeepSpeed 0.19 scales SP gradients differently per bucket"
        )
