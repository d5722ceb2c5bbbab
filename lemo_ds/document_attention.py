"""Document-aware attention for Hugging Face models, with no [s, s] mask anywhere.

For an sdpa model, Hugging Face turns packed rows (position ids restarting inside a row) and padding into a dense
[b, 1, s, s] mask; SDPA then leaves its flash kernel and the mask costs s^2 bytes per row. ``apply_lemo`` instead
switches the model to the attention registered here (``lemo_sdpa``, Hugging Face's AttentionInterface and
AttentionMaskInterface), whose mask function builds nothing for whole sequences, and installs a forward pre-hook
on the decoder that passes every layer the row's ``Documents`` (``lemo_ds.documents``). The attention then picks:

- one document per row, no padding: Hugging Face's own SDPA, causal, no mask (the flash kernel on a GPU); the
  model computes exactly what the unconverted one does;
- several documents on CUDA in fp16/bf16: ``torch.nn.attention.varlen.varlen_attn`` over the segments (causal),
  one launch, O(s) memory;
- anywhere else (CPU, fp32/fp64): Hugging Face's SDPA causal on each segment in turn: exact, and never more than
  one segment's scores at a time.

On CUDA, a call whose queries would pass torch's flash kernels' 32-bit limit (past 512K tokens of 32 x 128 heads,
one document or packed) runs in pieces under it instead (``lemo_ds.attention_pieces``): past it, those kernels'
query gradients are wrong.

A call with a cache prefix (generation after the first step) keeps Hugging Face's own SDPA mask and attention: only
whole sequences are described by documents.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from lemo_ds import attention_pieces
from lemo_ds.documents import Documents
from lemo_ds.hf_compat import CACHE_KWARGS

ATTENTION = "lemo_sdpa"
"""The attention implementation name a converted sdpa model runs under (``config._attn_implementation``)."""

DOCUMENTS_KWARG = "lemo_documents"
"""The keyword that carries ``Documents`` from the decoder to every layer and from there to its attention."""


def document_attention(
    module: nn.Module,
    query: torch.Tensor,  # [b, H, s, d] after RoPE
    key: torch.Tensor,  # [b, KV, s, d]
    value: torch.Tensor,  # [b, KV, s, d]
    documents: Documents,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each document of ``documents``: ([b, s, H, d], None), as Hugging Face's attention
    functions return it. ``kwargs``: the scaling, dropout, ... that Hugging Face passes to its SDPA."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _past_flash_limit(query, documents):
        return _pieces(query, key, value, documents, kwargs.get("scaling")), None
    if documents.single:
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None:
        return _varlen(query, key, value, documents, kwargs.get("scaling")), None
    return _per_segment(module, query, key, value, documents, **kwargs), None


def _per_segment(module, query, key, value, documents: Documents, **kwargs: Any) -> torch.Tensor:
    """Hugging Face's SDPA, causal, on each segment in turn (CPU, or dtypes the varlen kernel does not take)."""
    batch, _, seq, _ = query.shape
    cu_seqlens, _, _ = documents.segments()
    bounds = cu_seqlens.tolist()
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        row, begin = divmod(start, seq)
        end = begin + (stop - start)
        segment = slice(begin, end)
        out, _ = sdpa_attention_forward(module, query[row : row + 1, :, segment], key[row : row + 1, :, segment],
                                        value[row : row + 1, :, segment], None, is_causal=True, **kwargs)  # fmt: skip
        parts.append(out[0])  # [len, H, d]
    return torch.cat(parts).view(batch, seq, *parts[0].shape[1:])  # [b, s, H, d]


@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


@functools.cache
def _varlen_takes_gqa() -> bool:
    return "enable_gqa" in inspect.signature(_varlen_attn()).parameters


def varlen_causal(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    """torch's varlen_attn, causal (aligned at the bottom right where a sequence has fewer queries than keys):
    q [Tq, H, d], k and v [Tk, KV, d], cu_q and cu_k int32 cumulative lengths -> [Tq, H, d]."""
    # Grouped-query attention needs no repeated key/value heads: the flash kernel behind varlen_attn reads each
    # key/value head for its group of query heads (repeating them cost 2 x [T, H, d] more per layer at 128K).
    # Releases whose varlen_attn has the enable_gqa flag require it; older ones pass the heads straight through.
    extra = {"enable_gqa": True} if k.shape[1] != q.shape[1] and _varlen_takes_gqa() else {}
    # window_size (-1, 0): causal (no key to the right of the query), no limit to the left.
    return _varlen_attn()(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), **extra)


def _tokens_first(query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[b, heads, s, d] -> [b * s, heads, d] each, as the varlen kernels take them."""
    return tuple(t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))


def _varlen(query, key, value, documents: Documents, scaling: float | None) -> torch.Tensor:
    """One varlen launch over every segment of every row."""
    cu_seqlens, longest, _ = documents.segments()
    out = varlen_causal(*_tokens_first(query, key, value), cu_seqlens, cu_seqlens, longest, longest, scaling)
    return out.view(query.shape[0], query.shape[2], *out.shape[1:])  # [b, s, H, d]


def _past_flash_limit(query: torch.Tensor, documents: Documents) -> bool:
    batch, heads, seq, head_dim = query.shape
    limit = attention_pieces.FLASH_ELEMENT_LIMIT  # read per call: a test lowers it to run pieces at small sizes
    return attention_pieces.needs_pieces(batch * seq, documents.segments()[2], heads, head_dim, limit)


def _pieces(query, key, value, documents: Documents, scaling: float | None) -> torch.Tensor:
    """Flash attention in calls under its 32-bit limit."""
    head_dim = query.shape[3]
    limit = attention_pieces.PIECE_ELEMENT_LIMIT
    pieces = attention_pieces.plan_pieces(documents.segments()[0].tolist(), query.shape[1], head_dim, limit)
    scale = head_dim**-0.5 if scaling is None else scaling
    out = attention_pieces.piecewise_attention(*_tokens_first(query, key, value), pieces, scale)
    return out.view(query.shape[0], query.shape[2], *out.shape[1:])  # [b, s, H, d]


# ---- Hugging Face registration --------------------------------------------------------------------------------


def _attention(module, query, key, value, attention_mask, **kwargs):
    documents = kwargs.pop(DOCUMENTS_KWARG, None)
    if attention_mask is not None or documents is None:  # a mask Hugging Face built (a cache prefix), or no hook
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return document_attention(module, query, key, value, documents, **kwargs)


def _mask(*, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0, **kwargs: Any):
    if q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None  # whole sequences: the decoder's Documents describe them
    return sdpa_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset, **kwargs)


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, _mask)


def add_documents(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the decoder model (``LlamaModel``, ...): ``lemo_documents`` from the call's position
    ids and 2D attention mask, passed to every decoder layer and on to its attention. Calls with a cache prefix
    get none (their mask comes from Hugging Face, see ``_mask``)."""
    embeds = kwargs.get("inputs_embeds")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    reference = input_ids if input_ids is not None else embeds
    if reference is None or _cached_tokens(kwargs) > 0:
        return args, kwargs
    batch, seq = reference.shape[:2]
    mask = kwargs.get("attention_mask")
    padding = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    kwargs[DOCUMENTS_KWARG] = Documents.from_inputs(kwargs.get("position_ids"), padding, batch, seq, reference.device)
    return args, kwargs


def _cached_tokens(kwargs: dict) -> int:
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0
