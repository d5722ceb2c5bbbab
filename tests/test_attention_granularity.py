"""``eliminate: "attention"`` (LeMo's granularity): an eliminated block skips the attention sublayer only, and the MLP
runs on every row. Checked against the unmodified Hugging Face model (every block kept) and the independent masked
reference (tests/masked_reference.py, granularity "attention"), written from the contract: h' = h + where(kept,
attention over the kept keys, 0), out = h' + mlp(post_attention_norm(h'))."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from masked_reference import reference_forward
from tiny_models import VOCAB, packed_position_ids, tiny_model

import lemo_ds
from lemo_ds.config import LEMO_ARTIFACT_SELECTION
from lemo_ds.hf_compat import checkpointing_enable

BLOCK = 8
ATTENTION = {**LEMO_ARTIFACT_SELECTION, "block_size": BLOCK, "eliminate": "attention"}  # the masked reference's rule


def converted(model, **section):
    return lemo_ds.apply_lemo(copy.deepcopy(model), {**ATTENTION, **section})


def run(model, ids, weights, **inputs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **inputs).logits
    (logits.double() * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference(model, ids, weights, position_ids=None, **settings):
    model.zero_grad(set_to_none=True)
    logits = reference_forward(model, ids, None, position_ids, granularity="attention", block=BLOCK, **settings)
    (logits.double() * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(actual, expected, atol, rtol):
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=rtol)
    assert actual[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], atol=atol, rtol=rtol, msg=name)


def rows(b=2, s=70, seed=1):  # 70 = 8 full blocks + a partial tail block
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (b, s), generator=gen), torch.randn(b, s, VOCAB, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: its attention's per-head norms run on kept rows
def test_every_block_kept_equals_the_hf_model(family):
    model = tiny_model(family)
    ids, weights = rows()
    kept_all = converted(model, keep_ratio=0.3, min_blocks=1000, scorer="norm")
    assert_same(run(kept_all, ids, weights), run(model, ids, weights), atol=1e-12, rtol=1e-10)


# Every family once, each scorer twice: the layout's path is the same for every scorer.
@pytest.mark.parametrize("family, scorer", [("llama", "oracle"), ("qwen3", "oracle"), ("mistral", "norm"),
                                            ("qwen2", "norm")])  # fmt: skip
def test_matches_masked_reference(family, scorer):
    model = tiny_model(family, layers=4)
    ids, weights = rows()
    sparse = converted(model, keep_ratio=0.4, dense_layers=[0], scorer=scorer)
    expected = reference(model, ids, weights, ratios=[1.0, 0.4, 0.4, 0.4], scorer=scorer)
    assert_same(run(sparse, ids, weights), expected, atol=1e-10, rtol=1e-8)
    per_layer = lemo_ds.get_controller(sparse).stats()["keep_ratio_per_layer"]
    assert per_layer[0] == 1.0 and all(r < 0.6 for r in per_layer[1:])  # the attention's share, counted alike


def test_packed_rows_with_a_document_shorter_than_a_block():
    model = tiny_model("llama", layers=3)
    ids, weights = rows(s=64)
    position_ids = packed_position_ids(2, [5, 30, 29])  # document 0 is shorter than a block
    sparse = converted(model, keep_ratio=0.5, dense_layers=[0], scorer="oracle")
    expected = reference(model, ids, weights, position_ids, ratios=[1.0, 0.5, 0.5], scorer="oracle")
    assert_same(run(sparse, ids, weights, position_ids=position_ids), expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(reentrant):
    """Under checkpointing the whole sparse call is one checkpoint (the MLP needs every row), and the recompute runs
    on the forward's selection (the random scorer draws anew at every forward)."""
    model = tiny_model("llama", layers=3)
    ids, weights = rows()
    section = dict(keep_ratio=0.4, dense_layers=[0], scorer="random", seed=3)
    plain = run(converted(model, **section), ids, weights)
    checkpointed = copy.deepcopy(model)
    checkpointing_enable(checkpointed, use_reentrant=reentrant)
    if reentrant:
        checkpointed.enable_input_require_grads()
    sparse = lemo_ds.apply_lemo(checkpointed, {**ATTENTION, **section})
    calls = []
    for layer in sparse.model.layers:
        function = layer._gradient_checkpointing_func

        def counted(*args, _function=function, **kwargs):
            calls.append(1)
            return _function(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    assert_same(run(sparse, ids, weights), plain, atol=1e-10, rtol=1e-8)
    assert len(calls) == 3  # one checkpoint per layer: no kept-rows checkpoint inside the sparse ones


def test_bf16_is_as_close_to_the_reference_as_the_dense_model_is():
    """bf16: the sparse model against the fp64 masked reference on the same weights is about as far as bf16 is from
    fp64 anyway (measured on the dense model with the same weights)."""
    model64 = tiny_model("llama", layers=3)
    ids, weights = rows()
    section = dict(keep_ratio=0.5, dense_layers=[0], scorer="random", seed=1)
    exact = run(converted(model64, **section), ids, weights)
    low = run(converted(model64.to(torch.bfloat16), **section), ids, weights)
    dense_exact = run(tiny_model("llama", layers=3), ids, weights)
    dense_low = run(tiny_model("llama", layers=3).to(torch.bfloat16), ids, weights)
    error = (low[0].double() - exact[0]).norm() / exact[0].norm()
    dense_error = (dense_low[0].double() - dense_exact[0]).norm() / dense_exact[0].norm()
    assert error <= 3 * dense_error + 1e-3, (error, dense_error)
    for name in exact[1]:
        grad_error = (low[1][name].double() - exact[1][name]).norm() / exact[1][name].norm()
        assert grad_error < 0.1, name


def test_eliminated_rows_get_the_mlp_and_no_attention():
    """An eliminated row's output is its input plus the MLP of its input: no attention term, in forward."""
    model = tiny_model("llama", layers=2)
    sparse = converted(model, keep_ratio=0.25, dense_layers=[0], scorer="norm", inplace_writeback=False)
    layer = sparse.model.layers[1]
    seen = {}

    def capture(module, args, kwargs, output, _store=seen):
        _store["in"], _store["out"] = kwargs.get("hidden_states", args[0] if args else None), output

    handle = layer.register_forward_hook(partial(capture), with_kwargs=True)
    ids, _ = rows(b=1, s=64)
    with torch.no_grad():
        sparse.train()(input_ids=ids)
    handle.remove()
    hidden, out = seen["in"], seen["out"]
    mlp = model.model.layers[1].mlp
    norm = model.model.layers[1].post_attention_layernorm
    expected = hidden + mlp(norm(hidden))  # [1, s, h]
    same = torch.isclose(out, expected, atol=1e-12, rtol=0).all(-1)[0]  # [s]
    assert 0 < int(same.sum()) < 64  # the eliminated rows, and only those
    assert same.view(8, BLOCK).all(1).sum() == 8 - 2  # whole blocks: 2 of 8 kept (block 0 always)
