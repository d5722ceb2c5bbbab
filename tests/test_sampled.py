"""sampled_share: a share of each sparse layer's picks drawn at random, and the "processed" loss weighted by each
target's inverse probability of running through every sparse layer (the rule itself: tests/test_selection.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_memory import _checkpointed, assert_same, labelled_batch, loss_and_grads
from tiny_models import tiny_model

import lemo_ds
from lemo_ds.memory.segment_loss import IGNORE_INDEX, segment_lm_loss, shift_labels

BLOCK = 8
# 6 layers, 64 tokens = 8 blocks, block 0 forced. Layer 3 keeps 6: 3 by score, 2 drawn among the other 4 (weight
# 2). Layer 4 keeps 4 of layer 3's 6 (nested): 1 by score, 2 drawn among the other 4 (weight 2). Weights 1, 2, 4.
SECTION = {
    "keep_ratio": [1.0, 1.0, 1.0, 0.75, 0.5, 1.0],
    "scorer": "norm",
    "block_size": BLOCK,
    "loss_tokens": "processed",
    "nested_selection": True,
    "sampled_share": 0.5,
    "memory": {"segment_tokens": 16, "segment_loss_impl": "torch"},
}


def _model(**section):
    model = tiny_model("llama", layers=6)
    model.config.use_cache = False
    return lemo_ds.apply_lemo(model, {**SECTION, **section})


def _final_hidden(model) -> list[torch.Tensor]:
    """The final norm's outputs [b, s, h] of the next forwards: what the LM head reads."""
    captured = []
    model.model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    return captured


# ---- the segment loss with per-position weights ---------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "atol", "rtol"), [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)])
@pytest.mark.parametrize(("tokens", "segment"), [(37, 8), (131, 17)])
@pytest.mark.parametrize("num_items", [None, 50.0])
def test_weighted_segment_loss_equals_the_full_logits_reference(dtype, atol, rtol, tokens, segment, num_items):
    generator = torch.Generator().manual_seed(tokens)
    head = torch.nn.Linear(24, 53, bias=False).to(dtype)
    hidden = torch.randn(2, tokens, 24, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, 53, (2, tokens), generator=generator)  # already shifted
    targets[0, : tokens // 3] = IGNORE_INDEX
    weights = torch.rand(2, tokens, generator=generator) * 3.0  # [b, s]
    weights[1, ::5] = 0.0
    reference, hidden_ref = copy.deepcopy(head), hidden.detach().clone().requires_grad_()
    ce = F.cross_entropy(reference(hidden_ref).float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none")  # fmt: skip
    divisor = num_items if num_items is not None else weights.flatten()[targets.flatten() != IGNORE_INDEX].sum()
    expected = (ce * weights.flatten()).sum() / divisor
    ours = segment_lm_loss(head, hidden, None, segment, num_items, "torch", shift_labels=targets, weights=weights)
    scale = torch.tensor(1.7)  # a non-unit upstream gradient
    (expected * scale).backward()
    (ours * scale).backward()
    torch.testing.assert_close(ours, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(head.weight.grad, reference.weight.grad, atol=atol, rtol=rtol)


def test_weighted_segment_loss_refuses_liger():
    hidden, targets = torch.randn(1, 5, 4), torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match='"liger" cannot weight positions'):
        segment_lm_loss(torch.nn.Linear(4, 7, bias=False), hidden, None, impl="liger", shift_labels=targets,
                        weights=torch.ones(1, 5))  # fmt: skip


# ---- the model's loss --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skipped_weight", [0.0, 0.25])
def test_sampled_loss_is_the_inverse_probability_weighted_mean(skipped_weight):
    """The model's loss and gradients against the weighted mean computed by hand from full logits of the same forward:
    w = the controller's inverse probability on processed targets, skipped_loss_weight on the others."""
    model = _model(skipped_loss_weight=skipped_weight)
    hidden = _final_hidden(model)
    ids, labels = labelled_batch()
    loss = model(input_ids=ids, labels=labels).loss
    controller = lemo_ds.get_controller(model)
    processed, weights = controller.processed_rows, controller.processed_weights  # [b, s]
    assert weights is not None and weights.dtype == torch.float32
    assert set(weights[processed].unique().tolist()) == {1.0, 2.0, 4.0}  # the draws of both layers (SECTION)
    targets = shift_labels(labels)  # [b, s]
    logits = model.lm_head(hidden[-1]).float()  # [b, s, V]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    w = torch.where(processed, weights, skipped_weight) * (targets != IGNORE_INDEX)  # [b, s]
    expected = (ce * w.flatten()).sum() / w.sum()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    # Backward both through the same forward (the segment loss adds the LM head's gradient inside its backward).
    grads = []
    for total in (loss, expected):
        model.zero_grad(set_to_none=True)
        total.backward(retain_graph=True)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "lm_head.weight" in grads[0]
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-6, msg=name)


def test_without_a_sampled_share_the_processed_loss_is_unweighted():
    """sampled_share 0: no weights are kept, and the loss is the unweighted mean over the processed targets, exactly
    (the segment loss of the masked targets, as before the share existed)."""
    model = _model(sampled_share=0.0)
    hidden = _final_hidden(model)
    ids, labels = labelled_batch()
    loss = model(input_ids=ids, labels=labels).loss
    controller = lemo_ds.get_controller(model)
    assert controller.processed_weights is None
    masked = shift_labels(labels).masked_fill(~controller.processed_rows, IGNORE_INDEX)  # [b, s]
    with torch.no_grad():
        expected = segment_lm_loss(model.lm_head, hidden[-1], None, 16, None, "torch", shift_labels=masked)
    assert torch.equal(loss.detach(), expected)


def test_a_sampled_share_draws_only_in_training():
    """A sparse evaluation (apply_in_eval) keeps the best-scored blocks: the sampled model's eval loss is the unsampled
    one's; in training the draw changes the loss."""
    ids, labels = labelled_batch()
    sampled, scored = _model(apply_in_eval=True), _model(apply_in_eval=True, sampled_share=0.0)
    with torch.no_grad():
        assert torch.equal(sampled.eval()(input_ids=ids, labels=labels).loss,
                           scored.eval()(input_ids=ids, labels=labels).loss)  # fmt: skip
        assert not torch.equal(sampled.train()(input_ids=ids, labels=labels).loss,
                               scored.train()(input_ids=ids, labels=labels).loss)  # fmt: skip


@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("sparse_checkpointing", [True, False])
def test_checkpointed_sampled_model_gives_the_gradients_of_no_checkpointing(how, sparse_checkpointing):
    """Under activation checkpointing the recompute takes the forward's blocks back: same loss and gradients as the
    model without checkpointing (same seed, same draws), and the weights are counted once (not again in backward)."""
    model = tiny_model("llama", layers=6)
    ids, labels = labelled_batch()
    memory = {**SECTION["memory"], "sparse_checkpointing": sparse_checkpointing}
    section = {**SECTION, "scorer": "oracle", "memory": memory}
    plain = lemo_ds.apply_lemo(copy.deepcopy(model), section)
    checkpointed = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), section), how)
    assert_same(loss_and_grads(checkpointed, ids, labels), loss_and_grads(plain, ids, labels))
    ours, theirs = lemo_ds.get_controller(checkpointed), lemo_ds.get_controller(plain)
    assert torch.equal(ours.processed_rows, theirs.processed_rows)
    assert torch.equal(ours.processed_weights, theirs.processed_weights)  # read after backward: no recompute counted
    assert ours.processed_weights[ours.processed_rows].max() > 1.0
