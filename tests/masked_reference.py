"""An independent masked reference of token elimination, for the tests.

It runs the UNMODIFIED Hugging Face layers on every token, with the eliminated tokens removed as keys
through the attention mask, and replaces the outputs of eliminated rows by their inputs (``granularity="layer"``);
or, for ``"attention"``, runs the unmodified attention sublayer the same way, adds its output to the kept rows only
(h' = h + where(kept, attention, 0)), and the unmodified MLP sublayer on every row (out = h' + mlp(norm(h'))).
It shares no code
with lemo_ds's sparse layer, gather or write-back: it computes its own mask (causal, same document, no
padding), its own block scores and RoPE, and only the selection rule (top-k of scores plus forced blocks,
tested on its own in test_selection.py) is shared, so that exactly tied scores are broken the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lemo_ds.core.selection import forced_blocks, keep_block_count, select_blocks

# The selection rule this reference implements is LeMo's own (lemo_ds.config.LEMO_ARTIFACT_SELECTION): each sparse
# layer chooses on its own over the whole row, the loss on every token. The "lemo" section's defaults are the nested
# rule, so a test comparing with this reference starts its section from those keys (its scorer is its own).


def reference_mask(position_ids: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """[b, 1, s, s] bool: causal, within one document (position ids restart at 0), keys that are not padding."""
    batch, seq = position_ids.shape
    starts = (position_ids == 0).long()
    starts[:, 0] = 1
    doc = starts.cumsum(1)  # [b, s]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = causal[None] & (doc[:, :, None] == doc[:, None, :])  # [b, s, s]
    if padding is not None:
        mask &= padding.bool()[:, None, :]
    return mask[:, None]


def block_scores(kind: str, layer, hidden: torch.Tensor, cos, sin, mask: torch.Tensor, block: int) -> torch.Tensor:
    batch, seq, _ = hidden.shape
    n = math.ceil(seq / block)
    pad = n * block - seq
    if kind == "norm":
        norms = F.pad(hidden.double().norm(dim=-1), (0, pad))  # [b, n * B]
        sizes = torch.tensor([min(block, seq - i * block) for i in range(n)], dtype=torch.float64)
        return norms.view(batch, n, block).sum(-1) / sizes
    assert kind == "oracle"
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    d = attn.head_dim
    q = attn.q_proj(normed).view(batch, seq, -1, d).transpose(1, 2)
    k = attn.k_proj(normed).view(batch, seq, -1, d).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    pair = torch.relu(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)).mean(1)  # [b, s, s]
    pair = pair * mask[:, 0]
    pair = F.pad(pair, (0, pad, 0, pad))
    return pair.view(batch, n, block, n, block).amax(dim=(2, 4)).sum(1)


def kept_rows(scores: torch.Tensor, seq: int, block: int, ratio: float, min_blocks: int, always: list[int]):
    """[b, s] bool of kept tokens, by the contract's rule."""
    n = scores.shape[1]
    forced = forced_blocks(seq, block, always)
    blocks = select_blocks(scores, keep_block_count(n, ratio, min_blocks, len(forced)), forced)
    kept_blocks = torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, blocks, True)
    return kept_blocks.repeat_interleave(block, dim=1)[:, :seq]


@torch.no_grad()
def _no_grad_scores(*args):
    return block_scores(*args)


def reference_forward(
    model, input_ids, padding=None, position_ids=None, *, ratios, block, scorer, min_blocks=1, always=(0,), record=None,
    granularity="layer",
):
    """Logits [b, s, V] of the masked reference. ``ratios``: keep ratio per layer (1.0 = dense)."""
    inner = model.model
    batch, seq = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(seq).expand(batch, -1)
    hidden = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(hidden, position_ids)
    base = reference_mask(position_ids, padding)
    eye = torch.eye(seq, dtype=torch.bool)[None, None]
    eager = model.config._attn_implementation == "eager"

    def as_model_mask(mask: torch.Tensor) -> torch.Tensor:
        # sdpa takes a bool mask (True = attend); eager adds a float mask.
        return (
            torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, torch.finfo(hidden.dtype).min)
            if eager
            else mask
        )

    for index, layer in enumerate(inner.layers):
        ratio = ratios[index]
        if ratio >= 1.0:
            hidden = layer(
                hidden, attention_mask=as_model_mask(base), position_embeddings=(cos, sin), position_ids=position_ids
            )
            continue
        scores = _no_grad_scores(scorer, layer, hidden.detach(), cos, sin, base, block)
        kept = kept_rows(scores, seq, block, ratio, min_blocks, list(always))  # [b, s]
        if record is not None:
            record[index] = kept
        # Eliminated tokens are no keys; an eliminated query may see itself so its (discarded) row stays finite.
        mask = (base & kept[:, None, None, :]) | eye
        if granularity == "attention":
            attention, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden), attention_mask=as_model_mask(mask),
                position_embeddings=(cos, sin), position_ids=position_ids,
            )  # fmt: skip
            hidden = hidden + torch.where(kept[..., None], attention, torch.zeros_like(attention))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            continue
        out = layer(
            hidden, attention_mask=as_model_mask(mask), position_embeddings=(cos, sin), position_ids=position_ids
        )
        hidden = torch.where(kept[..., None], out, hidden)
    return model.lm_head(inner.norm(hidden))
