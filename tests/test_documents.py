"""Packed documents and padding without [s, s] masks: lemo_ds.documents and lemo_ds.document_attention.

The attention is checked against SDPA with an explicit mask (causal, same document, no padding key); the converted
model against the unmodified Hugging Face model (every keep ratio 1.0) and the independent masked reference (keep
0.4), on rows of many documents, documents shorter than a block, boundaries inside blocks and padding; and a
long packed row must never make a tensor of [s, s] elements.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from masked_reference import reference_forward, reference_mask
from tiny_models import VOCAB, packed_position_ids, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import lemo_ds
from lemo_ds.config import LEMO_ARTIFACT_SELECTION
from lemo_ds.document_attention import ATTENTION, document_attention
from lemo_ds.documents import Documents
from lemo_ds.predictors.labels import lo_block_from_mask

BLOCK = 8
# Rows of documents: many short ones, one shorter than a block, boundaries inside blocks.
LAYOUTS = {
    "many-short": [5, 9, 3, 12, 7, 11, 4, 13],
    "shorter-than-a-block": [3, 61],
    "boundary-inside-blocks": [20, 33, 11],
}


def _padding(batch: int, seq: int, side: str | None, count: int = 13) -> torch.Tensor | None:
    if side is None:
        return None
    padding = torch.ones(batch, seq, dtype=torch.long)
    if side == "right":
        padding[0, seq - count :] = 0
    else:
        padding[0, :count] = 0
    return padding


# ---- Documents ---------------------------------------------------------------------------------------------------


def test_keys_segments_and_gather():
    positions = packed_position_ids(2, [3, 5, 4])  # [2, 12]
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, 10:] = 0
    documents = Documents.from_inputs(positions, padding, 2, 12, torch.device("cpu"))
    assert documents.keys.tolist() == [[0] * 3 + [1] * 5 + [2] * 4, [0] * 3 + [1] * 5 + [2] * 2 + [-1] * 2]
    cu_seqlens, longest, count = documents.segments()
    assert cu_seqlens.tolist() == [0, 3, 8, 12, 15, 20, 22, 24] and longest == 5 and count == 7
    assert not documents.single
    kept = documents.gather(torch.tensor([[0, 2, 3, 11], [1, 4, 9, 10]]))
    assert kept.keys.tolist() == [[0, 0, 1, 2], [0, 1, 2, -1]]
    one = Documents.from_inputs(torch.arange(12)[None], None, 2, 12, torch.device("cpu"))
    assert one.single and one.doc_ids() is None and one.first_key_block(4) is None


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_first_key_block_equals_the_masks(layout):
    # The predictor's lo from documents equals the one read from the explicit mask (the mask-tensor path).
    lengths = LAYOUTS[layout]
    positions = packed_position_ids(2, lengths)
    seq = sum(lengths)
    documents = Documents.from_inputs(positions, None, 2, seq, torch.device("cpu"))
    expected = lo_block_from_mask(reference_mask(positions, None), BLOCK, seq)
    assert torch.equal(documents.first_key_block(BLOCK), expected)


# ---- the attention against SDPA with an explicit mask ---------------------------------------------------------


class _Attention(torch.nn.Module):
    """What Hugging Face's SDPA reads of an attention module."""

    is_causal = True
    num_key_value_groups = 2  # 4 query heads, 2 key/value heads


def _masked_sdpa(query, key, value, mask):  # mask [b, 1, s, s] bool
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    # A padding query attends to itself only, so that its (discarded) row stays finite.
    mask = mask | torch.eye(mask.shape[-1], dtype=torch.bool)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)  # [b, s, H, d]


# On a GPU, bf16 and fp16 take the varlen kernel (grouped-query heads passed as they are); fp32/fp64 and the CPU take
# the per-segment path.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("side", [None, "left", "right"])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float64, 1e-10, 1e-8), (torch.float32, 1e-5, 1e-4),
                                               (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 2e-3, 2e-3)])  # fmt: skip
def test_document_attention_equals_masked_sdpa(device, layout, side, dtype, atol, rtol):
    lengths = LAYOUTS[layout]
    batch, seq, heads, kv_heads, dim = 2, sum(lengths), 4, 2, 64
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, seq, dim, generator=generator).to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))  # fmt: skip
    positions = packed_position_ids(batch, lengths)
    padding = _padding(batch, seq, side)
    documents = Documents.from_inputs(positions, padding, batch, seq, torch.device(device))
    out, _ = document_attention(_Attention(), q, k, v, documents, scaling=dim**-0.5)
    # The reference in fp64 on the CPU: the error measured is ours alone.
    reference = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    expected = _masked_sdpa(*reference, reference_mask(positions, padding))
    real = torch.ones(batch, seq, 1, 1, dtype=torch.bool) if padding is None else padding.bool()[..., None, None]
    out = out.cpu().double()
    torch.testing.assert_close(out * real, expected * real, atol=atol, rtol=rtol)
    weights = torch.randn(out.shape, generator=generator, dtype=torch.float64) * real
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), reference)
    for name, ours, theirs in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(ours.cpu().double(), theirs, atol=atol * 10, rtol=rtol, msg=name)


# ---- the converted model ----------------------------------------------------------------------------------------


def _loss_and_grads(model, ids, weights, **inputs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **inputs).logits
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _batch(seq, side, lengths):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, seq), generator=generator)
    weights = torch.randn(2, seq, VOCAB, generator=generator, dtype=torch.float64)
    padding = _padding(2, seq, side)
    if padding is not None:
        ids = ids.masked_fill(padding == 0, 0)
        weights = weights * padding[..., None]  # compare real tokens only: padded rows are nobody's output
    return ids, weights, packed_position_ids(2, lengths), padding


def _assert_close(ours, theirs, valid, atol=1e-10, rtol=1e-8):
    torch.testing.assert_close(ours[0] * valid, theirs[0] * valid, atol=atol, rtol=rtol)
    assert ours[1].keys() == theirs[1].keys()
    for name in theirs[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], atol=atol, rtol=rtol, msg=name)


# Hugging Face's model applies its document mask only to rows without padding: the padded cases hold one document.
@pytest.mark.parametrize("layout, side", [*((layout, None) for layout in LAYOUTS), ("one", "left"), ("one", "right")])
@pytest.mark.parametrize("convert", ["apply_lemo", "enable_document_attention"])
def test_dense_model_on_packed_rows_equals_hugging_face(layout, side, convert):
    lengths = LAYOUTS.get(layout, [64])
    model = tiny_model("llama")
    ids, weights, positions, padding = _batch(sum(lengths), side, lengths)
    converted = copy.deepcopy(model)
    if convert == "apply_lemo":
        lemo_ds.apply_lemo(converted, {"block_size": BLOCK, "keep_ratio": 1.0})
    else:  # the dense job's attention (launch/train.py without a "lemo" section)
        assert lemo_ds.enable_document_attention(converted)
    assert converted.config._attn_implementation == ATTENTION
    # use_cache=False: with a cache Hugging Face does not look for packed documents (apply_lemo turns it off).
    inputs = {"position_ids": positions, "attention_mask": padding, "use_cache": False}
    valid = 1 if padding is None else padding[..., None]
    _assert_close(_loss_and_grads(converted, ids, weights, **inputs), _loss_and_grads(model, ids, weights, **inputs),
                  valid)  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("side", [None, "left", "right"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_sparse_model_on_packed_rows_equals_the_masked_reference(layout, side, checkpointing):
    lengths = LAYOUTS[layout]
    model = tiny_model("llama")
    ids, weights, positions, padding = _batch(sum(lengths), side, lengths)
    section = {**LEMO_ARTIFACT_SELECTION, "block_size": BLOCK, "dense_layers": [0], "scorer": "oracle"}
    sparse = lemo_ds.apply_lemo(copy.deepcopy(model), section)
    if checkpointing:
        sparse.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours = _loss_and_grads(sparse, ids, weights, position_ids=positions, attention_mask=padding)
    model.zero_grad(set_to_none=True)
    logits = reference_forward(model, ids, padding, positions, ratios=[1.0, 0.4, 0.4, 0.4], block=BLOCK,
                               scorer="oracle")  # fmt: skip
    (logits * weights).sum().backward()
    theirs = (logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()})
    _assert_close(ours, theirs, 1 if padding is None else padding[..., None])


def test_remove_lemo_restores_the_attention():
    model = tiny_model("llama")
    converted = lemo_ds.apply_lemo(model, {"block_size": BLOCK, "keep_ratio": 0.4})
    assert converted.config._attn_implementation == ATTENTION
    lemo_ds.remove_lemo(converted)
    assert converted.config._attn_implementation == "sdpa"
    assert not converted.model._forward_pre_hooks


def test_document_attention_alone_is_undone_and_left_out_where_it_does_not_apply():
    model = tiny_model("llama")
    assert lemo_ds.enable_document_attention(model) and lemo_ds.enable_document_attention(model)  # idempotent
    assert len(model.model._forward_pre_hooks) == 1
    lemo_ds.disable_document_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert not model.model._forward_pre_hooks
    # apply_lemo on a model that has it keeps it after remove_lemo (the harness switches variants this way).
    assert lemo_ds.enable_document_attention(model)
    lemo_ds.remove_lemo(lemo_ds.apply_lemo(model, {"block_size": BLOCK, "keep_ratio": 0.4}))
    assert model.config._attn_implementation == ATTENTION and len(model.model._forward_pre_hooks) == 1
    lemo_ds.disable_document_attention(model)
    eager = tiny_model("llama", attn="eager")
    assert not lemo_ds.enable_document_attention(eager)
    assert eager.config._attn_implementation == "eager"


# ---- no [s, s] tensor on a long packed row ----------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def _largest_tensor_in_a_step(model, ids, positions) -> int:
    with _LargestTensor() as spy:
        model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()
    return spy.largest


@pytest.mark.slow
@pytest.mark.parametrize("keep_ratio", [1.0, 0.4])
def test_a_long_packed_row_makes_no_quadratic_tensor(keep_ratio):
    seq = 8192
    lengths = [250 + 11 * i for i in range(19)]
    lengths.append(seq - sum(lengths))  # 20 documents
    model = tiny_model("llama", layers=4, dtype=torch.float32, max_position_embeddings=seq)
    ids = torch.randint(1, VOCAB, (1, seq))
    positions = packed_position_ids(1, lengths)
    quadratic = seq * seq // 4  # the largest tensor of a converted step is [s, 1024] (the vocabulary): linear in s
    # The check can fail: the unconverted model builds Hugging Face's [1, 1, s, s] document mask.
    assert _largest_tensor_in_a_step(model, ids, positions) >= seq * seq
    section = {"keep_ratio": keep_ratio, "dense_layers": [0], "scorer": "oracle", "kernels": "torch"}
    converted = lemo_ds.apply_lemo(model, section)
    assert _largest_tensor_in_a_step(converted, ids, positions) < quadratic
