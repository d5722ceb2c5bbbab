"""Token elimination on real Hugging Face models, against the unmodified model and a masked reference."""

from __future__ import annotations

import copy
import inspect
from functools import partial

import pytest
import torch
from masked_reference import reference_forward
from one_rank_group import start_one_rank_group
from tiny_models import FAMILIES, VOCAB, packed_position_ids, tiny_model

import lemo_ds
from lemo_ds.config import LEMO_ARTIFACT_SELECTION
from lemo_ds.decoder_layer import is_sparse_layer

BLOCK = 8
# Where the Triton kernels run: CUDA when there is a GPU, else the CPU under TRITON_INTERPRET=1 (conftest.py).
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lemo_copy(model, **section):
    """A converted copy under LeMo's rule (the masked reference's) unless ``section`` says otherwise."""
    converted = copy.deepcopy(model)
    return lemo_ds.apply_lemo(converted, {"block_size": BLOCK, **LEMO_ARTIFACT_SELECTION, **section})


def loss_and_grads(model, input_ids, weights, **inputs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, **inputs).logits
    loss = (logits * weights).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def reference_and_grads(model, ids, weights, position_ids=None, **reference):
    """The masked reference's logits and gradients (same form as loss_and_grads): tests/masked_reference.py's
    forward on ``model``'s own weights, ``reference`` its ratios, block and scorer."""
    model.zero_grad(set_to_none=True)
    logits = reference_forward(model, ids, None, position_ids, **reference)
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(actual, expected, atol=0.0, rtol=0.0):
    logits_a, grads_a = actual
    logits_e, grads_e = expected
    torch.testing.assert_close(logits_a, logits_e, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_a[name], grads_e[name], atol=atol, rtol=rtol, msg=name)


def batch(b=2, s=61, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=generator)
    weights = torch.randn(b, s, VOCAB, generator=generator, dtype=torch.float64)
    return ids, weights


# ---- every block kept: exactly the dense model ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_all_blocks_kept_equals_hf_model(family, kernels):
    """keep 1.0 through the whole gather / layer / write-back path (min_blocks forces every block)."""
    device = KERNEL_DEVICE if kernels == "triton" else torch.device("cpu")
    model = tiny_model(family).to(device)
    ids, weights = (t.to(device) for t in batch())
    sparse = lemo_copy(model, keep_ratio=0.3, min_blocks=1000, scorer="norm", kernels=kernels)
    assert sum(is_sparse_layer(m) for m in sparse.modules()) == 1  # layers 0, 1 and 3 stay dense (LeMo's layout)
    assert_same(loss_and_grads(sparse, ids, weights), loss_and_grads(model, ids, weights))
    assert lemo_ds.get_controller(sparse).stats()["keep_ratio_per_layer"] == [1.0] * 4


def test_keep_ratio_one_equals_hf_model_every_layer():
    model = tiny_model("llama")
    ids, weights = batch()
    sparse = lemo_copy(model, keep_ratio=[1.0] * 4, dense_layers=[], scorer="norm")
    assert_same(loss_and_grads(sparse, ids, weights), loss_and_grads(model, ids, weights))


def test_eval_is_dense_by_default():
    model = tiny_model("llama").eval()
    ids, _ = batch()
    sparse = lemo_copy(model, keep_ratio=0.25, dense_layers=[0], scorer="norm").eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        applied = lemo_ds.apply_lemo(
            copy.deepcopy(model),
            {"block_size": BLOCK, "keep_ratio": 0.25, "dense_layers": [0], "scorer": "norm", "apply_in_eval": True},
        ).eval()
        assert not torch.allclose(applied(input_ids=ids).logits, model(input_ids=ids).logits)
        # A KV cache needs every token of every layer: asking for one with elimination on is a clear error.
        with pytest.raises(lemo_ds.LemoInputError, match="use_cache=False"):
            applied(input_ids=ids, use_cache=True)


# ---- below 1: the masked reference ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("scorer", ["oracle", "norm"])
def test_matches_masked_reference(family, scorer):
    model = tiny_model(family, layers=4)
    ids, weights = batch(s=70)  # 70 = 8 full blocks + a partial tail block
    section = dict(keep_ratio=0.4, dense_layers=[0], scorer=scorer)
    sparse = lemo_copy(model, **section)
    expected = reference_and_grads(model, ids, weights, ratios=[1.0, 0.4, 0.4, 0.4], block=BLOCK, scorer=scorer)
    assert_same(loss_and_grads(sparse, ids, weights), expected, atol=1e-10, rtol=1e-8)
    stats = lemo_ds.get_controller(sparse).stats()["keep_ratio_per_layer"]
    assert stats[0] == 1.0 and all(r < 0.6 for r in stats[1:])


def test_matches_masked_reference_on_the_triton_kernels():
    """The same on the Triton gather and write-back kernels (the interpreter on a CPU machine): "auto" takes them on
    CUDA only, so the other tests of this file run the PyTorch references on a CPU machine. (The oracle-score kernel
    needs a head dim of 16 or more: tests/test_kernels_oracle_scores.py.)"""
    model = tiny_model("llama", layers=4).to(KERNEL_DEVICE)
    ids, weights = (t.to(KERNEL_DEVICE) for t in batch(s=70))
    sparse = lemo_copy(model, keep_ratio=0.4, dense_layers=[0], scorer="norm", kernels="triton")
    expected = reference_and_grads(model, ids, weights, ratios=[1.0, 0.4, 0.4, 0.4], block=BLOCK, scorer="norm")
    assert_same(loss_and_grads(sparse, ids, weights), expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        # YaRN: cos and sin carry its attention factor, and the ramp interpolates only the low frequencies
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16},
    ],
    ids=["linear", "yarn"],
)
def test_matches_masked_reference_under_context_extension_rope(rope):
    """The rope types of the accuracy benchmark's extended models (benchmarks/accuracy/pretrain.py): every block
    kept equals the Hugging Face model, keep 0.4 equals the masked reference."""
    model = tiny_model("llama", rope_parameters=rope, max_position_embeddings=64)
    ids, weights = batch(s=70)
    kept_all = lemo_copy(model, keep_ratio=0.4, min_blocks=1000, scorer="oracle")
    assert_same(loss_and_grads(kept_all, ids, weights), loss_and_grads(model, ids, weights))
    sparse = lemo_copy(model, keep_ratio=0.4, dense_layers=[0], scorer="oracle")
    expected = reference_and_grads(model, ids, weights, ratios=[1.0, 0.4, 0.4, 0.4], block=BLOCK, scorer="oracle")
    assert_same(loss_and_grads(sparse, ids, weights), expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_masked_reference_with_padding(side):
    model = tiny_model("llama")
    ids, weights = batch(s=64)
    padding = torch.ones_like(ids)
    if side == "right":
        padding[0, 41:] = 0
    else:
        padding[0, :23] = 0
    ids = ids.masked_fill(padding == 0, 0)
    valid = padding.bool()[..., None]  # compare real tokens only: padded rows are nobody's output
    weights = weights * valid
    positions = (padding.cumsum(1) - 1).clamp_min(0)  # as generate() does for left padding
    sparse = lemo_copy(model, keep_ratio=0.5, dense_layers=[0], scorer="oracle")
    ours = loss_and_grads(sparse, ids, weights, attention_mask=padding, position_ids=positions)
    expected_logits = reference_forward(
        model, ids, padding, positions, ratios=[1.0, 0.5, 0.5, 0.5], block=BLOCK, scorer="oracle"
    )
    (expected_logits * weights).sum().backward()
    torch.testing.assert_close(ours[0] * valid, expected_logits.detach() * valid, atol=1e-10, rtol=1e-8)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[1][name], param.grad, atol=1e-10, rtol=1e-8, msg=name)


def test_matches_masked_reference_with_packed_documents():
    model = tiny_model("llama")
    ids, weights = batch(s=72)
    positions = packed_position_ids(2, [20, 33, 19])  # documents starting mid-block
    sparse = lemo_copy(model, keep_ratio=0.4, dense_layers=[0], scorer="oracle")
    ours = loss_and_grads(sparse, ids, weights, position_ids=positions)
    expected = reference_and_grads(
        model, ids, weights, position_ids=positions, ratios=[1.0, 0.4, 0.4, 0.4], block=BLOCK, scorer="oracle"
    )
    assert_same(ours, expected, atol=1e-10, rtol=1e-8)


def test_eager_attention_matches_masked_reference():
    model = tiny_model("mistral", attn="eager")
    ids, weights = batch(s=48)
    sparse = lemo_copy(model, keep_ratio=0.5, dense_layers=[0], scorer="norm")
    expected = reference_and_grads(model, ids, weights, ratios=[1.0, 0.5, 0.5, 0.5], block=BLOCK, scorer="norm")
    # Eager attention takes its softmax in float32 whatever the model dtype: float32 rounding of different sums.
    assert_same(loss_and_grads(sparse, ids, weights), expected, atol=1e-5, rtol=1e-4)


# ---- the layer's own guarantees --------------------------------------------------------------------------


def sparse_layer_and_inputs(seed=0, s=45, scorer="random", checkpointing=False, **section):
    model = lemo_copy(tiny_model("llama", seed=seed), keep_ratio=0.3, dense_layers=[0], scorer=scorer, **section)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = model.model.layers[1]
    hidden = torch.randn(2, s, 32, dtype=torch.float64, requires_grad=True)
    positions = torch.arange(s).expand(2, -1)
    cos, sin = model.model.rotary_emb(hidden, positions)
    return model, layer, hidden, dict(position_embeddings=(cos, sin), position_ids=positions, attention_mask=None)


def kept_token_mask(model, layer, hidden, kwargs):
    """Which rows the layer changed: [b, s] bool."""
    with torch.no_grad():
        out = layer(hidden.detach().clone(), **kwargs)
    return (out != hidden.detach()).any(-1)


@pytest.mark.parametrize("inplace", [True, False])
def test_eliminated_rows_are_identity_forward_and_backward(inplace):
    model, layer, hidden, kwargs = sparse_layer_and_inputs(inplace_writeback=inplace)
    kept = kept_token_mask(model, layer, hidden, kwargs)
    assert 0 < kept.sum() < kept.numel()
    model.model.layers[1]._lemo.sparse.controller.micro_step = 0  # same random draw as the probe above
    source = hidden * 1.0  # a non-leaf, so the in-place write-back is allowed
    out = layer(source, **kwargs)
    torch.testing.assert_close(out[~kept], hidden.detach()[~kept], atol=0, rtol=0)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(hidden.grad[~kept], upstream[~kept], atol=0, rtol=0)
    assert not torch.equal(hidden.grad[kept], upstream[kept])


def test_kept_tokens_keep_their_true_positions():
    model, layer, hidden, kwargs = sparse_layer_and_inputs(s=40)
    seen = {}

    def spy(module, args, kw):
        seen["cos"], seen["sin"] = kw["position_embeddings"]
        seen["positions"] = kw["position_ids"]

    handle = layer.self_attn.register_forward_pre_hook(spy, with_kwargs=True)
    kept = kept_token_mask(model, layer, hidden, kwargs)
    handle.remove()
    rows = [torch.nonzero(k).flatten() for k in kept]
    cos, sin = kwargs["position_embeddings"]
    for b, row in enumerate(rows):
        assert torch.equal(seen["positions"][b], row)  # sorted ascending: causal order preserved
        torch.testing.assert_close(seen["cos"][b], cos[b, row], atol=0, rtol=0)
        torch.testing.assert_close(seen["sin"][b], sin[b, row], atol=0, rtol=0)


def test_causal_given_the_selection():
    """With a content-independent selection (random scorer, fixed draw), the output at position i does not
    depend on tokens after i. (Score-based selection looks at the whole sequence, as LeMo's does.)"""
    model, layer, hidden, kwargs = sparse_layer_and_inputs(s=48)
    controller = layer._lemo.sparse.controller
    cut = 29
    changed = hidden.detach().clone()
    changed[:, cut + 1 :] = torch.randn_like(changed[:, cut + 1 :])
    with torch.no_grad():
        controller.micro_step = 5
        out_a = layer(hidden.detach().clone(), **kwargs)
        controller.micro_step = 5
        out_b = layer(changed, **kwargs)
    torch.testing.assert_close(out_a[:, : cut + 1], out_b[:, : cut + 1], atol=0, rtol=0)
    assert not torch.equal(out_a[:, cut + 1 :], out_b[:, cut + 1 :])


@pytest.mark.parametrize("scorer", ["random", "oracle"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(scorer, reentrant):
    model = tiny_model("llama")
    ids, weights = batch(s=56)
    plain = lemo_copy(model, keep_ratio=0.4, dense_layers=[0], scorer=scorer, seed=3)
    checkpointed = lemo_copy(model, keep_ratio=0.4, dense_layers=[0], scorer=scorer, seed=3)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        checkpointed.enable_input_require_grads()
    assert_same(loss_and_grads(checkpointed, ids, weights), loss_and_grads(plain, ids, weights))


def _checkpointed_as_trainer_does(model, when, reentrant, **section):
    """``model`` converted with ``section`` and Hugging Face checkpointing enabled the way Trainer does it
    (``gradient_checkpointing_enable``), before or after apply_lemo."""
    model = copy.deepcopy(model)
    enable = partial(model.gradient_checkpointing_enable, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if when == "before":
        enable()
    lemo_ds.apply_lemo(model, {"block_size": BLOCK, **section})
    if when == "after":
        enable()
    return model


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("sparse_checkpointing", [True, False])
def test_hf_checkpointing_with_the_default_section(when, reentrant, sparse_checkpointing):
    # The default section's layout: the first half dense, several sparse layers in a row (each writing into the
    # previous one's output) up to the last, enabled before or after conversion, reentrant or not.
    model = tiny_model("llama", layers=6)
    ids, weights = batch(s=64)
    section = dict(keep_ratio=0.4, scorer="oracle", memory={"sparse_checkpointing": sparse_checkpointing})
    plain = lemo_ds.apply_lemo(copy.deepcopy(model), {"block_size": BLOCK, **section})
    checkpointed = _checkpointed_as_trainer_does(model, when, reentrant, **section)
    sparse = [is_sparse_layer(layer) for layer in checkpointed.model.layers]
    assert sparse == [False, False, False, True, True, True]
    assert_same(loss_and_grads(checkpointed, ids, weights), loss_and_grads(plain, ids, weights))


@pytest.mark.parametrize("sparse_checkpointing", [True, False])
def test_every_layer_takes_exactly_one_checkpoint(sparse_checkpointing):
    # Hugging Face's checkpoint wrapper moved between releases (around __call__, then around forward): a sparse
    # layer must be checkpointed once, by itself, never also by that wrapper (nested checkpoints recompute twice
    # and forbid the in-place write-back).
    model = tiny_model("llama", layers=6)
    ids, weights = batch(s=64)
    section = dict(keep_ratio=0.4, scorer="oracle", memory={"sparse_checkpointing": sparse_checkpointing})
    checkpointed = _checkpointed_as_trainer_does(model, "after", False, **section)
    calls = []
    for index, layer in enumerate(checkpointed.model.layers):
        function = layer._gradient_checkpointing_func

        def counted(*args, _function=function, _index=index, **kwargs):
            calls.append(_index)
            return _function(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    loss_and_grads(checkpointed, ids, weights)
    assert calls == list(range(6))


def _init_single_process_deepspeed():
    """A one-rank gloo group and DeepSpeed's checkpointing configured: what deepspeed.checkpointing needs."""
    import deepspeed

    start_one_rank_group(29400)
    deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=False)


def test_deepspeed_activation_checkpointing_gives_the_same_gradients():
    import deepspeed

    # DeepSpeed's checkpointing keeps its RNG states on the accelerator: run where DeepSpeed's accelerator is.
    model = tiny_model("llama").to(KERNEL_DEVICE)
    ids, weights = (t.to(KERNEL_DEVICE) for t in batch(s=56))
    plain = lemo_copy(model, keep_ratio=0.4, dense_layers=[0], scorer="random", seed=3)
    checkpointed = lemo_copy(model, keep_ratio=0.4, dense_layers=[0], scorer="random", seed=3)
    _init_single_process_deepspeed()
    checkpointed.gradient_checkpointing_enable()
    checkpointed._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=deepspeed.checkpointing.checkpoint
    )
    checkpointed.enable_input_require_grads()
    assert_same(loss_and_grads(checkpointed, ids, weights), loss_and_grads(plain, ids, weights))


@pytest.mark.parametrize("asked_by", ["call", "config"])
def test_output_hidden_states_are_not_overwritten(asked_by):
    model = tiny_model("llama", layers=6)
    ids, _ = batch(s=40)
    sparse = lemo_copy(model, keep_ratio=0.4, dense_layers=[0], scorer="norm")
    if asked_by == "config":
        sparse.config.output_hidden_states = True
        out = sparse(input_ids=ids)
    else:
        out = sparse(input_ids=ids, output_hidden_states=True)
    states = out.hidden_states
    assert len(states) == 7
    # A kept-row write-back in place would have made consecutive captured states alias each other.
    for before, after in zip(states[1:-2], states[2:-1], strict=True):
        assert not torch.equal(before, after)


# ---- wrappers, errors, schedule ---------------------------------------------------------------------------


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    ids, weights = batch()
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a non-zero adapter, so the comparison sees it
    reference = copy.deepcopy(lora)
    converted = lemo_ds.apply_lemo(
        lora, {"block_size": BLOCK, "keep_ratio": 0.3, "min_blocks": 1000, "scorer": "oracle"}
    )
    assert converted is lora and lemo_ds.get_controller(lora) is not None
    ours, theirs = loss_and_grads(converted, ids, weights), loss_and_grads(reference, ids, weights)
    assert_same(ours, theirs)
    assert all("lora_" in name for name in ours[1])


def test_state_dict_and_remove_lemo_round_trip():
    model = tiny_model("llama")
    keys = list(model.state_dict())
    sparse = lemo_copy(model, keep_ratio=0.4)
    assert list(sparse.state_dict()) == keys
    lemo_ds.remove_lemo(sparse)
    assert not any(is_sparse_layer(m) for m in sparse.modules())
    assert type(sparse.model.layers[3]) is type(model.model.layers[3])
    assert lemo_ds.get_controller(sparse) is None


def test_save_pretrained_writes_the_models_own_architecture(tmp_path):
    """config.json names the model's class (tools pick the class by it), and the model stays converted."""
    import json

    from transformers import AutoModelForCausalLM

    sparse = lemo_copy(tiny_model("llama"), keep_ratio=0.4)
    converted = type(sparse)
    sparse.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert type(sparse) is converted and lemo_ds.get_controller(sparse) is not None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(loaded.lm_head.weight, sparse.lm_head.weight.to(loaded.lm_head.weight.dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_shows_the_models_forward_signature(family):
    """Hugging Face's Trainer keeps only the batch columns that ``model.forward`` names (position_ids among them)."""
    model = tiny_model(family)
    expected = inspect.signature(model.forward)
    sparse = lemo_copy(model, keep_ratio=0.4)
    assert type(sparse) is not type(model) and inspect.signature(sparse.forward) == expected


def test_unsupported_model_family_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(lemo_ds.UnsupportedModelError, match="supported model types: llama, mistral, qwen2"):
        lemo_ds.apply_lemo(model, {"keep_ratio": 0.5})


def test_sequence_shorter_than_a_block_is_a_clear_error():
    sparse = lemo_copy(tiny_model("llama"), keep_ratio=0.5, scorer="norm")
    with pytest.raises(lemo_ds.LemoInputError, match="shorter than one lemo block"):
        sparse(input_ids=torch.randint(1, VOCAB, (1, BLOCK - 1)))


def test_unsupported_attention_is_a_clear_error():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(lemo_ds.LemoConfigError, match="attn_implementation"):
        lemo_ds.apply_lemo(model, {"keep_ratio": 0.5})


def test_applying_twice_is_a_clear_error():
    sparse = lemo_copy(tiny_model("llama"), keep_ratio=0.5)
    with pytest.raises(lemo_ds.LemoConfigError, match="already converted"):
        lemo_ds.apply_lemo(sparse, {"keep_ratio": 0.5})


def test_warm_up_schedule_dense_then_linear_ramp():
    sparse = lemo_copy(tiny_model("llama"), keep_ratio=0.4, schedule={"dense_steps": 2, "ramp_steps": 4})
    controller = lemo_ds.get_controller(sparse)
    seen = []
    for step in range(8):
        controller.set_step(step)
        seen.append(round(controller.keep_ratio(2, training=True), 6))
    assert seen == [1.0, 1.0, 1.0, 0.85, 0.7, 0.55, 0.4, 0.4]
    assert controller.keep_ratio(3, training=True) == 1.0  # the last layer is dense in LeMo's layout
    assert controller.keep_ratio(2, training=False) == 1.0  # eval is dense by default
