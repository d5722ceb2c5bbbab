"""The memory stack: segment loss, sparsity-aware checkpointing, tiled MLP; each alone and together."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, packed_position_ids, tiny_model

import lemo_ds
from lemo_ds.config import LEMO_ARTIFACT_RULE
from lemo_ds.memory.segment_loss import IGNORE_INDEX, hf_causal_lm_loss_ref, segment_lm_loss

BLOCK = 8
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MEMORY_OFF = {"segment_loss": False, "sparse_checkpointing": False, "tiled_mlp": False, "compact_saves": False}


def labelled_batch(b=2, s=64, seed=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=generator)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt that is not trained on
    labels[1, 30] = IGNORE_INDEX  # a document start in a packed row
    return ids, labels


def loss_and_grads(model, ids, labels, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **inputs)
    out.loss.backward()
    return out, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ours, theirs, atol=1e-6, rtol=1e-6):
    # Hugging Face computes the cross-entropy in float32 whatever the model dtype (logits.float()): float64
    # models agree to float32 rounding of differently ordered sums.
    torch.testing.assert_close(ours[1], theirs[1], atol=atol, rtol=rtol)
    assert ours[2].keys() == theirs[2].keys()
    for name in theirs[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], atol=atol, rtol=rtol, msg=name)


# ---- segment loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [(torch.float64, 1e-6, 1e-6), (torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)],
)
@pytest.mark.parametrize(("tokens", "segment"), [(2, 1), (37, 8), (64, 64), (130, 17)])
@pytest.mark.parametrize("num_items", [None, 50])
def test_segment_loss_equals_hf_loss(dtype, atol, rtol, tokens, segment, num_items):
    generator = torch.Generator().manual_seed(tokens)
    head = torch.nn.Linear(24, 53, bias=False).to(dtype)
    hidden = torch.randn(2, tokens, 24, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, 53, (2, tokens), generator=generator)
    labels[0, : tokens // 3] = IGNORE_INDEX
    reference = copy.deepcopy(head)
    hidden_ref = hidden.detach().clone().requires_grad_()
    expected = hf_causal_lm_loss_ref(reference(hidden_ref), labels, num_items)
    ours = segment_lm_loss(head, hidden, labels, segment_tokens=segment, num_items_in_batch=num_items, impl="torch")
    scale = torch.tensor(1.7)  # a non-unit upstream gradient (loss scaling, accumulation)
    (expected * scale).backward()
    (ours * scale).backward()
    torch.testing.assert_close(ours, expected.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(head.weight.grad, reference.weight.grad, atol=atol, rtol=rtol)


def test_segment_loss_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="allowed values are auto, liger, torch"):
        segment_lm_loss(torch.nn.Linear(4, 5), torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), impl="cuda")


@pytest.mark.parametrize("full_finetuning", [False, True])
def test_model_with_segment_loss_equals_hf_model(full_finetuning):
    """Dense model (keep 1.0 everywhere) + segment loss against the unmodified model: packed documents, ignored
    positions, loss and every gradient; no full logits come back."""
    model = tiny_model("llama")
    # With a KV cache in training, Hugging Face skips the packed-document mask (it detects packing only when no
    # cache is passed); apply_lemo turns the cache off, so the reference must too.
    model.config.use_cache = False
    if not full_finetuning:  # LoRA-like: only some weights train, the LM head is frozen
        for name, param in model.named_parameters():
            param.requires_grad_("q_proj" in name or "v_proj" in name)
    ids, labels = labelled_batch()
    positions = packed_position_ids(2, [30, 34])
    ours = lemo_ds.apply_lemo(copy.deepcopy(model), {"keep_ratio": 1.0, "memory": {"segment_tokens": 16}})
    result = loss_and_grads(ours, ids, labels, position_ids=positions)
    assert result[0].logits is None
    assert_same(result, loss_and_grads(model, ids, labels, position_ids=positions))
    with torch.no_grad():  # without labels the model gives its logits as usual
        assert ours(input_ids=ids).logits.shape == (2, 64, VOCAB)


# ---- sparsity-aware checkpointing -------------------------------------------------------------------------


def _checkpointed(model, how):
    if how.startswith("deepspeed") and torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        pytest.skip("DeepSpeed's checkpointing moves its inputs to its accelerator, CUDA on this machine: CPU "
                    "tensors are checked on CPU machines")  # fmt: skip
    if how.startswith("deepspeed"):
        import deepspeed
        from test_sparse_model import _init_single_process_deepspeed

        _init_single_process_deepspeed()
        # "deepspeed-cpu": DeepSpeed's CPU checkpointing, which moves the stored inputs to host memory (on the CPU
        # accelerator it needs lemo_ds's fix, lemo_ds/memory/ds_checkpointing.py, which apply_lemo installs).
        deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=how == "deepspeed-cpu")
        model.gradient_checkpointing_enable()
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=deepspeed.checkpointing.checkpoint)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": how == "reentrant"})
    model.enable_input_require_grads()
    return model


@pytest.mark.parametrize(
    "how",
    [
        "non-reentrant",
        "reentrant",
        "deepspeed",
        # DeepSpeed 0.19.8's synchronous CPU checkpointing kept a 0-d placeholder instead of the input wherever the
        # host copy is a no-op (the CPU accelerator): fixed by lemo_ds/memory/ds_checkpointing.py.
        "deepspeed-cpu",
    ],
)
@pytest.mark.parametrize("sparse_checkpointing", [True, False])
def test_sparse_checkpointing_gives_the_gradients_of_no_checkpointing(how, sparse_checkpointing):
    # DeepSpeed's checkpointing keeps its RNG states (and moves its inputs) on its accelerator: run there.
    device = "cuda" if how.startswith("deepspeed") and torch.cuda.is_available() else "cpu"
    model = tiny_model("llama", layers=6).to(device)
    ids, labels = (t.to(device) for t in labelled_batch())
    section = {
        "block_size": BLOCK,
        "keep_ratio": 0.4,
        "dense_layers": [0],
        "scorer": "oracle",
        "memory": {**MEMORY_OFF, "sparse_checkpointing": sparse_checkpointing},
    }
    plain = lemo_ds.apply_lemo(copy.deepcopy(model), section)
    checkpointed = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), section), how)
    assert_same(loss_and_grads(checkpointed, ids, labels), loss_and_grads(plain, ids, labels))


def _saved_bytes(model, ids, labels) -> int:
    """Bytes of the tensors autograd saves for backward during one forward (saved-tensor hooks), each storage
    counted once (the gather and the write-back save the same index tensor)."""
    total, seen = 0, set()

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return total


@pytest.mark.slow
def test_stored_activations_follow_the_formula():
    """Under (reentrant) checkpointing a dense layer stores its input [b, s, h]; a sparse layer its kept rows
    [b, K, h] and their indices [b, K]: stored bytes = (dense layers x s + sum of kept rows) x b x h x bytes +
    the indices, plus what lies outside the layers (embedding, final norm, loss), measured on the dense model."""
    layers, seq, batch, hidden, item = 6, 64, 2, 32, 8
    # On the kernels' device (CUDA where there is one; on CPU the tests run Triton's interpreter): the formula
    # counts what the Triton gather and write-back store, not their torch reference.
    model = tiny_model("llama", layers=layers).to(KERNEL_DEVICE)
    ids, labels = (t.to(KERNEL_DEVICE) for t in labelled_batch(b=batch, s=seq))
    memory = {**MEMORY_OFF, "sparse_checkpointing": True}
    dense = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), {"keep_ratio": 1.0, "memory": memory}), "reentrant")
    outside = _saved_bytes(dense, ids, labels) - layers * batch * seq * hidden * item
    section = {"block_size": BLOCK, "keep_ratio": [1.0, 0.5, 0.25, 0.5, 0.25, 1.0], "scorer": "norm", "memory": memory,
               "kernels": "triton"}  # fmt: skip
    sparse = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), section), "reentrant")
    kept_rows = [seq if r == 1.0 else round(r * seq / BLOCK) * BLOCK for r in section["keep_ratio"]]
    indices = sum(k for k, r in zip(kept_rows, section["keep_ratio"]) if r < 1.0) * batch * 8  # int64 kept rows
    assert _saved_bytes(sparse, ids, labels) == outside + sum(kept_rows) * batch * hidden * item + indices
    # Without sparsity-aware checkpointing every layer stores its whole input, as in the dense model.
    section["memory"] = MEMORY_OFF
    whole = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), section), "reentrant")
    assert _saved_bytes(whole, ids, labels) == outside + layers * seq * batch * hidden * item


# ---- tiled MLP, and everything together --------------------------------------------------------------------


def test_tiled_mlp_equals_the_plain_mlp():
    model = tiny_model("qwen2")
    ids, labels = labelled_batch(s=70)
    ours = lemo_ds.apply_lemo(
        copy.deepcopy(model), {"keep_ratio": 1.0, "memory": {**MEMORY_OFF, "tiled_mlp": True, "tiled_mlp_tokens": 16}}
    )
    assert_same(loss_and_grads(ours, ids, labels), loss_and_grads(model, ids, labels))


@pytest.mark.parametrize("how", ["non-reentrant", "deepspeed"])
def test_all_features_together_equal_each_alone(how):
    """Elimination + segment loss + sparsity-aware checkpointing + tiled MLP against elimination alone."""
    model = tiny_model("llama", layers=6)
    ids, labels = labelled_batch(s=72)
    base = {**LEMO_ARTIFACT_RULE, "block_size": BLOCK, "keep_ratio": 0.4, "dense_layers": [0, 5]}  # the loss on all
    alone = lemo_ds.apply_lemo(copy.deepcopy(model), {**base, "memory": MEMORY_OFF})
    everything = {
        "segment_loss": True,
        "segment_tokens": 24,
        "sparse_checkpointing": True,
        "tiled_mlp": True,
        "tiled_mlp_tokens": 16,
    }
    stacked = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), {**base, "memory": everything}), how)
    assert_same(loss_and_grads(stacked, ids, labels), loss_and_grads(alone, ids, labels), atol=1e-10, rtol=1e-8)


def test_remove_lemo_undoes_every_feature():
    model = tiny_model("llama")
    converted = lemo_ds.apply_lemo(copy.deepcopy(model), {"keep_ratio": 0.5, "memory": {"tiled_mlp": True}})
    lemo_ds.remove_lemo(converted)
    assert type(converted) is type(model)
    assert [type(m) for m in converted.modules()] == [type(m) for m in model.modules()]


# ---- saved-tensor compaction and host offload of checkpoint inputs ------------------------------------------


def lora_model(layers=4, dtype=torch.bfloat16, device="cpu"):
    """The benchmarked kind of model, tiny: bf16 base, peft LoRA on q/k/v/o with float32 adapters."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", layers=layers, dtype=dtype).to(device)
    model.config.use_cache = False
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for param in model.parameters():  # non-zero B: every adapter's gradient path is exercised
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
    return model.train()


def assert_identical(ours, theirs):
    """Bit-identical loss and gradients (compaction and offload change where bytes live, not the arithmetic). On
    CUDA two runs of the same step may differ in the last bits (atomics in attention's backward): close there."""
    assert ours[2].keys() == theirs[2].keys() and ours[2]
    if ours[1].is_cuda:
        assert_same(ours, theirs, atol=2e-3, rtol=2e-2)
        return
    assert torch.equal(ours[1], theirs[1]), (ours[1], theirs[1])
    for name in theirs[2]:
        assert torch.equal(ours[2][name], theirs[2][name]), name


def _section(keep, **memory):
    return {"block_size": BLOCK, "keep_ratio": keep, "dense_layers": [0], "scorer": "norm",
            "memory": {**MEMORY_OFF, "sparse_checkpointing": True, **memory}}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("how", [None, "non-reentrant", "reentrant", "deepspeed"])
@pytest.mark.parametrize("keep", [1.0, 0.4])
@pytest.mark.parametrize("segment_loss", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_compaction_gives_identical_loss_and_gradients(how, keep, segment_loss, device):
    """With the segment loss the final norm and the loss are compacted too (the loss stores the norm's input)."""
    if device == "cuda" and how == "deepspeed":
        pytest.skip("DeepSpeed's checkpoint on CUDA is covered by the benchmarks")
    model = lora_model(device=device)
    ids, labels = (t.to(device) for t in labelled_batch())
    results = []
    for compact in (False, True):
        section = _section(keep, compact_saves=compact, segment_loss=segment_loss, segment_tokens=24)
        converted = lemo_ds.apply_lemo(copy.deepcopy(model), section)
        results.append(loss_and_grads(converted if how is None else _checkpointed(converted, how), ids, labels))
    assert_identical(results[1], results[0])


def _stored_bytes(model, ids, labels) -> int:
    """Bytes of the storages autograd holds for backward when the forward ends (each once, parameters aside): an
    offloaded checkpoint input then points at an empty placeholder and counts 0."""
    packed, params = [], {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    # A view keeps its base's storage alive whatever its own ``.data`` now points at: count the bases too (an
    # offloaded input that was a view of the layer input once freed nothing on the H200 while counting 0 here).
    held = [t for t in packed] + [t._base for t in packed if t._base is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    total = sum(n for ptr, n in storages.items() if ptr not in params)
    loss.backward()
    return total


def test_compaction_stores_less():
    """bf16 + float32 LoRA adapters, no checkpointing: the float32 copies and SiLU's output are no longer stored."""
    model = lora_model()
    ids, labels = labelled_batch()
    plain = _stored_bytes(lemo_ds.apply_lemo(copy.deepcopy(model), _section(1.0)), ids, labels)
    compact = _stored_bytes(lemo_ds.apply_lemo(copy.deepcopy(model), _section(1.0, compact_saves=True)), ids, labels)
    # Per layer and token (h = 32, I = 64): 32h + 6I = 1408 bytes -> 12h + 4I = 640 bytes (accounting's formula).
    assert compact < 0.6 * plain, (compact, plain)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["non-reentrant", "reentrant", "deepspeed", "deepspeed-cpu"])
@pytest.mark.parametrize("keep", [1.0, 0.4])
def test_offload_gives_identical_loss_and_gradients(device, how, keep):
    if device == "cuda" and how.startswith("deepspeed"):
        pytest.skip("DeepSpeed's checkpoint on CUDA is covered by the benchmarks")
    model = lora_model(device=device)
    ids, labels = (t.to(device) for t in labelled_batch())
    results = []
    for offload in (False, True):
        converted = lemo_ds.apply_lemo(copy.deepcopy(model), _section(keep, offload_checkpoints=offload,
                                                                      compact_saves=True, tiled_mlp=True,
                                                                      tiled_mlp_tokens=16))
        converted = _checkpointed(converted, how)
        for _ in range(2):  # a second step reuses the pooled host buffers
            result = loss_and_grads(converted, ids, labels)
        results.append(result)
        if offload:
            offloader = lemo_ds.get_controller(converted) and converted.get_base_model()._lemo.offloader
            assert offloader.offloaded_bytes > 0 and all(entry.restored for entry in offloader.entries)
    assert_identical(results[1], results[0])


@pytest.mark.slow
def test_stored_inputs_follow_the_formula_and_offload_moves_them_out():
    """Reentrant checkpointing: a dense layer stores its input [b, s, h], a sparse one its kept rows [b, K, h]
    (and their indices); with offload the layer inputs are on the host and the device keeps only the indices."""
    layers, seq, batch, hidden, item = 6, 64, 2, 32, 8
    # On the kernels' device (CUDA where there is one; on CPU the tests run Triton's interpreter): the formula
    # counts what the Triton gather and write-back store, not their torch reference.
    model = tiny_model("llama", layers=layers).to(KERNEL_DEVICE)
    ids, labels = (t.to(KERNEL_DEVICE) for t in labelled_batch(b=batch, s=seq))
    memory = {**MEMORY_OFF, "sparse_checkpointing": True, "compact_saves": True}
    dense = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), {"keep_ratio": 1.0, "memory": memory}), "reentrant")
    outside = _stored_bytes(dense, ids, labels) - layers * batch * seq * hidden * item
    ratios = [1.0, 0.5, 0.25, 0.5, 0.25, 1.0]
    kept_rows = [seq if r == 1.0 else round(r * seq / BLOCK) * BLOCK for r in ratios]
    indices = sum(k for k, r in zip(kept_rows, ratios) if r < 1.0) * batch * 8  # int64 kept rows
    for offload in (False, True):
        section = {"block_size": BLOCK, "keep_ratio": ratios, "scorer": "norm", "kernels": "triton",
                   "memory": {**memory, "offload_checkpoints": offload}}
        sparse = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), section), "reentrant")
        inputs = 0 if offload else sum(kept_rows) * batch * hidden * item
        assert _stored_bytes(sparse, ids, labels) == outside + inputs + indices
        if offload:
            assert sparse._lemo.offloader.offloaded_bytes == sum(kept_rows) * batch * hidden * item


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compaction_leaves_no_reference_cycle_holding_activations(checkpointing):
    """With Python's cyclic collector off, a training step with compaction keeps no tensor alive after backward (a
    reference cycle through the saved-tensor hooks once kept every step's activations until gc ran: on the H200 the
    benchmark's peaks grew 9-15 GiB a round)."""
    import gc

    model = tiny_model("llama")
    model.config.use_cache = False
    model = lemo_ds.apply_lemo(model, {"keep_ratio": 0.5, "block_size": BLOCK, "scorer": "norm",
                                       "memory": {"compact_saves": True, "segment_tokens": 16}})  # fmt: skip
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ids, labels = labelled_batch()

    def live_numel() -> int:
        return sum(o.numel() for o in gc.get_objects() if torch.is_tensor(o))

    gc.collect()
    gc.disable()
    try:
        before = live_numel()
        for _ in range(2):
            model(input_ids=ids, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)
        leaked = live_numel() - before
    finally:
        gc.enable()
    assert leaked < 1000, f"{leaked} tensor elements outlived the steps without the cyclic collector"


@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
def test_offload_keeps_no_restored_input_after_backward(how):
    """Once a layer's backward is done, nothing of the offloader holds its restored input: the entries once did until
    the next forward, and at 64K on the H200 11 GiB of restored inputs were alive at the peak."""
    import gc
    import weakref

    model = _checkpointed(lemo_ds.apply_lemo(lora_model(), _section(0.5, offload_checkpoints=True)), how)
    ids, labels = labelled_batch()
    offloader = model.get_base_model()._lemo.offloader
    gc.disable()
    try:
        loss = model(input_ids=ids, labels=labels).loss
        aliases = [weakref.ref(alias) for entry in offloader.entries for alias in entry.aliases]
        assert aliases
        loss.backward()
        del loss
        alive = sum(ref() is not None for ref in aliases)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of {len(aliases)} restored layer inputs outlived the backward"


@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
def test_compaction_under_checkpointing_holds_no_more_during_forward(how):
    """Under checkpointing a layer keeps only its input once its forward is done, with or without compaction. The
    causal LM's compaction (segment loss) once also recorded the layers' SiLUs and held their sources (every MLP
    gate tile) until the loss was computed: 21.7 GiB at 64K on the H200. Counted when the final norm starts."""
    import gc

    def live_numel() -> int:
        return sum(o.numel() for o in gc.get_objects() if torch.is_tensor(o))

    ids, labels = labelled_batch()
    held = []
    for compact in (False, True):
        section = _section(0.5, compact_saves=compact, segment_loss=True, segment_tokens=24, tiled_mlp=True,
                           tiled_mlp_tokens=16)
        model = _checkpointed(lemo_ds.apply_lemo(lora_model(), section), how)
        counts = []
        model.get_base_model().model.norm.register_forward_pre_hook(lambda *_, into=counts: into.append(live_numel()))
        gc.collect()
        gc.disable()
        try:
            before = live_numel()
            model(input_ids=ids, labels=labels).loss.backward()
        finally:
            gc.enable()
        held.append(counts[0] - before)
    assert held[1] <= held[0], f"before the final norm: {held[1]} elements alive with compaction, {held[0]} without"


def test_offload_host_pool_stays_bounded_when_the_kept_rows_change_every_step():
    """On packed rows a sparse layer keeps a different number of rows from step to step. The host pool was keyed by
    shape and kept a buffer of every shape ever offloaded (pinned memory growing without bound: the 520K run on the
    H200 failed there). Over 40 steps of three layers whose row counts wander over 13 values, the pool holds no more
    buffers than inputs offloaded at once, each under twice the largest input, and the gradients are the ones
    without offload."""
    import functools

    from lemo_ds.memory.offload import CheckpointOffloader, HostPool

    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    pool = HostPool()
    step = [0]
    offloader = CheckpointOffloader(generation=lambda: step[0], pool=pool)
    offloaded = offloader.wrap(checkpoint)
    weight = torch.randn(16, 16, requires_grad=True)

    def layer(t):
        return torch.tanh(t @ weight)

    largest = 0
    for step[0] in range(40):
        rows = [8 * (3 + (step[0] * 7 + 5 * i) % 13) for i in range(3)]  # [3]: each layer's kept rows this step
        inputs = [torch.randn(r, 16) for r in rows]
        grads = []
        for run in (checkpoint, offloaded):
            weight.grad = None
            sum(run(layer, x.clone().requires_grad_()).square().sum() for x in inputs).backward()
            grads.append(weight.grad.clone())
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
        largest = max(largest, max(rows) * 16 * 4)
        assert len(pool.free["pageable"]) <= len(rows), f"step {step[0]}: {len(pool.free['pageable'])} buffers"
    assert pool.allocated_bytes <= len(rows) * 2 * largest


MIB = 1 << 20


@pytest.mark.parametrize("nbytes", [1, 4096, 2 * MIB - 1, 2 * MIB + 1, 409_600_000, 4 << 30, (4 << 30) + 1,
                                    5_368_709_120, 6_710_886_400])  # fmt: skip
def test_host_capacity_of_each_kind(nbytes):
    """power_of_two: the power of two PyTorch's host allocator takes; registered: rounded up to a sixteenth of that
    power of two, at least 2 MiB, so under 1/8 over the request beyond 16 MiB; pageable: exact. The planner counts
    these (lemo_ds/plan/memory.py)."""
    from lemo_ds.memory.offload import host_capacity

    pow2 = 1 << (nbytes - 1).bit_length()
    assert host_capacity(nbytes, "power_of_two") == pow2 >= nbytes
    assert host_capacity(nbytes, "pageable") == nbytes
    registered = host_capacity(nbytes, "registered")
    granule = max(2 * MIB, pow2 // 16)
    assert registered % granule == 0 and nbytes <= registered < nbytes + granule
    assert registered <= max(pow2, 2 * MIB)
    if nbytes > 16 * MIB:
        assert registered < nbytes * 1.125


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA: page-locking by cudaHostRegister")
@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
def test_registered_pinned_buffers_offload_like_the_pinned_ones(how):
    """memory.pinned_buffers "registered": the offloaded inputs go to host buffers page-locked by cudaHostRegister
    (about their size), and the loss and gradients are those of PyTorch's pinned buffers, over two steps (the second
    reuses the buffers)."""
    from lemo_ds.memory.offload import HostPool, host_capacity

    model = lora_model(device="cuda")
    ids, labels = (t.to("cuda") for t in labelled_batch())
    results = []
    for kind in ("power_of_two", "registered"):
        converted = lemo_ds.apply_lemo(copy.deepcopy(model), _section(0.4, offload_checkpoints=True,
                                                                      pinned_buffers=kind))  # fmt: skip
        converted = _checkpointed(converted, how)
        offloader = converted.get_base_model()._lemo.offloader
        offloader.pool = HostPool()  # this model's buffers alone
        for _ in range(2):
            result = loss_and_grads(converted, ids, labels)
        results.append(result)
        buffers = offloader.pool.free[kind]
        assert buffers and all(b.is_pinned() for b in buffers)
        if kind == "registered":
            sizes = [shape.numel() * 2 for e in offloader.entries for shape in e.shapes]  # bf16 layer inputs
            assert sorted(b.numel() for b in buffers) == sorted(host_capacity(n, "registered") for n in sizes)
    assert_identical(results[1], results[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA: page-locking by cudaHostRegister")
def test_registered_buffers_are_unregistered_when_freed_and_can_be_registered_again():
    """A registered buffer is unregistered when its pool replaces it and when its pool is dropped, so that memory
    mapped again at the same address registers again (cudaHostRegister refused a range still registered: error 712,
    the first time this path ran on an H100)."""
    import gc

    from lemo_ds.memory import offload

    for _ in range(3):
        pool = offload.HostPool()
        small = pool.acquire(3 * MIB, "registered")
        assert small.is_pinned() and small.data_ptr() % 4096 == 0 and small.numel() == 4 * MIB
        pool.release(small, "registered")
        del small
        large = pool.acquire(40 * MIB, "registered")  # frees the smaller free buffer first: unregistered then
        assert large.is_pinned() and len(offload._REGISTRATIONS) == 1
        large.fill_(7)
        assert torch.equal(large.to("cuda", non_blocking=True).cpu(), large)
        pool.release(large, "registered")
        del pool, large
        gc.collect()
        assert not offload._REGISTRATIONS  # the dropped pool's buffer: unregistered with its memory


@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
def test_resident_checkpoints_keep_the_first_layers_inputs_and_offload_the_rest(how):
    """memory.resident_checkpoints 2 on a 4-layer model: each forward offloads the inputs of layers 2 and 3 only (two
    entries, their bytes), over two steps, and the loss and gradients are those without offload."""
    model = lora_model(layers=4)
    ids, labels = labelled_batch()
    results = []
    for memory in ({}, {"offload_checkpoints": True, "resident_checkpoints": 2}):
        converted = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), _section(0.4, **memory)), how)
        for _ in range(2):
            result = loss_and_grads(converted, ids, labels)
        results.append(result)
    offloader = converted.get_base_model()._lemo.offloader
    assert offloader.resident == 2 and len(offloader.entries) == 2 and all(e.restored for e in offloader.entries)
    # layers 2 and 3 are sparse (dense_layers [0]; keep 0.4 of 64 rows = 2 blocks of 16... their kept rows), bf16
    kept = sum(shape.numel() for entry in offloader.entries for shape in entry.shapes) * 2
    assert offloader.offloaded_bytes == kept > 0
    assert_identical(results[1], results[0])


# ---- fewer stored inputs: memory.layers_per_stored_input ---------------------------------------------------


@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("k", [2, 3])
def test_fewer_stored_inputs_rebuild_the_others_by_running_the_layer_below(how, k):
    """Seven rebuildable layers of a chain, k = 2 or 3: only the first of every k stores its input (the host bytes
    and entries say which), each of the others reruns the layers below it in its group once, and the gradients are
    bit for bit those of the plain checkpoint, over two steps."""
    import functools

    from lemo_ds.memory.offload import CheckpointOffloader, HostPool

    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=how == "reentrant")
    step = [0]
    offloader = CheckpointOffloader(generation=lambda: step[0], pool=HostPool(), layers_per_stored_input=k)
    rebuildable = offloader.wrap(checkpoint, rebuildable=True)
    weights = [torch.randn(16, 16, requires_grad=True) for _ in range(7)]
    calls = [0] * 7

    def layer(i, t):  # t [5, 16]
        calls[i] += 1
        return torch.tanh(t @ weights[i]) + t

    for step[0] in range(2):
        x = torch.randn(5, 16, requires_grad=True)
        grads = []
        for run in (checkpoint, rebuildable):
            calls[:] = [0] * 7
            for w in weights:
                w.grad = None
            h = x
            for i in range(7):
                h = run(functools.partial(layer, i), h)
            h.square().sum().backward()
            grads.append([w.grad.clone() for w in weights])
        for ours, theirs in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        stored = [i for i in range(7) if i % k == 0]
        assert [e.source is None for e in offloader.entries] == [i % k == 0 for i in range(7)]
        assert offloader.offloaded_bytes == len(stored) * 5 * 16 * 4 and offloader.rebuilt_inputs == 7 - len(stored)
        assert all(e.restored and e.rerun is None and not e.aliases for e in offloader.entries)
        # forward and recompute, and once more to rebuild the next layer's input unless it ends its group
        group_ends = {min(i - i % k + k, 7) - 1 for i in range(7)}
        assert calls == [2 + (i not in group_ends) for i in range(7)]


def test_fewer_stored_inputs_store_again_where_the_chain_breaks():
    """An input that is not the last rebuildable call's output (another tensor, the output changed in place since,
    or a call that is not rebuildable in between) is stored, and the gradients stay those of the plain checkpoint."""
    import functools

    from lemo_ds.memory.offload import CheckpointOffloader, HostPool

    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    offloader = CheckpointOffloader(pool=HostPool(), layers_per_stored_input=4)
    rebuildable, other = offloader.wrap(checkpoint, rebuildable=True), offloader.wrap(checkpoint)
    w = torch.randn(16, 16, requires_grad=True)

    def layer(t):
        return torch.tanh(t @ w) + t

    x = torch.randn(4, 16, requires_grad=True)
    grads = []
    for dense, sparse in ((checkpoint, checkpoint), (rebuildable, other)):
        w.grad = None
        h = dense(layer, x)  # stored
        h = dense(layer, h)  # rebuilt from the first
        h = dense(layer, h * 1.0)  # another tensor: stored
        h = dense(layer, h)  # rebuilt
        h.mul_(0.5)
        h = dense(layer, h)  # the same tensor, changed in place since the last call: stored
        h = sparse(layer, h)  # not rebuildable: stored
        h = dense(layer, h)  # the last call was not rebuildable: stored
        h.square().sum().backward()
        grads.append(w.grad.clone())
    assert [e.source is not None for e in offloader.entries] == [False, True, False, True, False, False, False]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("how", ["reentrant", "deepspeed"])
@pytest.mark.parametrize("k", [2, 3])
def test_fewer_stored_inputs_give_identical_loss_and_gradients(how, k):
    """A converted model with dense layers 0-2 and 4-5 and sparse 3 and 6: layers_per_stored_input k stores the
    input of the first of every k layers of each dense run (the sparse layers store their kept rows), as the
    planner's term counts them, and the loss and gradients over two steps are those of offload with every input
    stored."""
    from lemo_ds.plan import memory as plan_memory

    model = lora_model(layers=7)
    ids, labels = labelled_batch()
    results, offloaders = [], []
    for every in (1, k):
        section = {**_section(0.4, offload_checkpoints=True, layers_per_stored_input=every, tiled_mlp=True,
                              tiled_mlp_tokens=16), "dense_layers": [0, 1, 2, 4, 5]}  # fmt: skip
        converted = _checkpointed(lemo_ds.apply_lemo(copy.deepcopy(model), section), how)
        for _ in range(2):
            result = loss_and_grads(converted, ids, labels)
        results.append(result)
        offloaders.append(converted.get_base_model()._lemo.offloader)
    rebuilt = [e.source is not None for e in offloaders[1].entries]
    assert rebuilt == {2: [False, True, False, False, False, True, False],
                       3: [False, True, True, False, False, True, False]}[k]  # fmt: skip
    assert rebuilt == plan_memory.rebuilt_inputs(tuple(1.0 if i in (0, 1, 2, 4, 5) else 0.4 for i in range(7)), k)
    dense_input = 2 * 64 * 32 * 2  # [b, s, h] bf16
    assert offloaders[0].offloaded_bytes - offloaders[1].offloaded_bytes == sum(rebuilt) * dense_input
    assert_identical(results[1], results[0])
