"""loss_tokens "processed" (the loss counts only positions that ran through every sparse layer) and
nested_selection (a block eliminated once stays eliminated in the later sparse layers)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_memory import assert_same, labelled_batch, loss_and_grads
from tiny_models import tiny_model

import lemo_ds
from lemo_ds.config import LEMO_ARTIFACT_RULE
from lemo_ds.errors import LemoConfigError
from lemo_ds.memory.segment_loss import IGNORE_INDEX

BLOCK = 8
# 6 layers: "auto" keeps 0-2 and 5 dense, 3 and 4 sparse.
# LeMo's rule, which these tests change one key at a time.
SECTION = {**LEMO_ARTIFACT_RULE, "keep_ratio": 0.5, "scorer": "norm", "block_size": BLOCK,
           "memory": {"segment_tokens": 16}}  # fmt: skip


def _model(**section):
    model = tiny_model("llama", layers=6)
    model.config.use_cache = False
    return lemo_ds.apply_lemo(model, {**SECTION, **section})


def _selections(model):
    """Record every sparse layer's kept blocks [b, k] of the next forwards."""
    controller = lemo_ds.get_controller(model)
    seen = []
    original = controller.note_selection

    def note(blocks, rows, seq):
        seen.append(blocks.clone())
        original(blocks, rows, seq)

    controller.note_selection = note
    return seen


@pytest.mark.parametrize("nested", [False, True])
def test_processed_loss_equals_the_loss_with_skipped_positions_ignored(nested):
    """The "processed" loss and its gradients equal the "all" loss of the same model (same selection: it is a
    function of the input) with the labels of every position whose row skipped a sparse layer set to ignore."""
    ids, labels = labelled_batch()
    ours = _model(loss_tokens="processed", nested_selection=nested)
    reference = copy.deepcopy(ours)
    lemo_ds.get_controller(reference).config = lemo_ds.get_controller(ours).config.model_copy(
        update={"loss_tokens": "all"}
    )
    result = loss_and_grads(ours, ids, labels)
    processed = lemo_ds.get_controller(ours).processed_rows  # [b, s]
    assert processed is not None and 0 < processed.float().mean() < 1
    # Independent masking: the label at t + 1 is predicted by row t.
    masked = labels.clone()
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if not processed[b, t]:
                masked[b, t + 1] = IGNORE_INDEX
    expected = loss_and_grads(reference, ids, masked)
    assert_same(result, expected)
    assert not torch.allclose(result[1], loss_and_grads(reference, ids, labels)[1])  # the masking did something


@pytest.mark.parametrize("weight", [0.25, 1.0])
def test_skipped_loss_weight_weighs_the_skipped_targets(weight):
    """skipped_loss_weight w: loss = (sum over processed + w x sum over skipped) / (n_processed + w x n_skipped),
    built here from two independently masked "all" losses of the same model; gradients too. w = 1 is the "all"
    loss."""
    ids, labels = labelled_batch()
    ours = _model(loss_tokens="processed", nested_selection=True, skipped_loss_weight=weight)
    reference = copy.deepcopy(ours)
    lemo_ds.get_controller(reference).config = lemo_ds.get_controller(ours).config.model_copy(
        update={"loss_tokens": "all", "skipped_loss_weight": 0.0}
    )
    result = loss_and_grads(ours, ids, labels)
    processed = lemo_ds.get_controller(ours).processed_rows  # [b, s]
    kept, dropped = labels.clone(), labels.clone()
    for b in range(labels.shape[0]):
        kept[b, 0] = dropped[b, 0] = IGNORE_INDEX
        for t in range(labels.shape[1] - 1):
            (kept if not processed[b, t] else dropped)[b, t + 1] = IGNORE_INDEX
    n_kept, n_dropped = int((kept != IGNORE_INDEX).sum()), int((dropped != IGNORE_INDEX).sum())
    assert n_kept > 0 and n_dropped > 0
    reference.zero_grad(set_to_none=True)
    sum_kept = reference(input_ids=ids, labels=kept).loss * n_kept
    sum_dropped = reference(input_ids=ids, labels=dropped).loss * n_dropped
    loss = (sum_kept + weight * sum_dropped) / (n_kept + weight * n_dropped)
    loss.backward()
    expected = (None, loss.detach(), {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None})
    assert_same(result, expected)
    if weight == 1.0:
        assert_same(result, loss_and_grads(reference, ids, labels))


def test_skipped_loss_weight_needs_the_processed_loss():
    with pytest.raises(LemoConfigError, match="skipped_loss_weight"):
        _model(skipped_loss_weight=0.5)


def test_nested_selection_keeps_only_blocks_still_in_play():
    # The random scorer: independent choices per layer, so without nesting they are not nested.
    model = _model(nested_selection=True, scorer="random", keep_ratio=[1.0, 1.0, 1.0, 0.75, 0.5, 1.0])
    seen = _selections(model)
    ids, labels = labelled_batch()
    model(input_ids=ids, labels=labels).loss.backward()
    first, second = seen  # layers 3 and 4
    for b in range(ids.shape[0]):
        assert set(second[b].tolist()) <= set(first[b].tolist())
    # Without nesting the choices are not nested on this input (so the assertion above can fail).
    free = _model(scorer="random", keep_ratio=[1.0, 1.0, 1.0, 0.75, 0.5, 1.0])
    free_seen = _selections(free)
    free(input_ids=ids, labels=labels)
    assert any(not set(free_seen[1][b].tolist()) <= set(free_seen[0][b].tolist()) for b in range(ids.shape[0]))


def test_processed_loss_in_eval_is_the_dense_loss():
    ids, labels = labelled_batch()
    model = _model(loss_tokens="processed").eval()
    dense = _model(keep_ratio=1.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, dense(input_ids=ids, labels=labels).loss)


def test_processed_loss_needs_the_segment_loss():
    with pytest.raises(LemoConfigError, match="segment_loss"):
        _model(loss_tokens="processed", memory={"segment_loss": False})
