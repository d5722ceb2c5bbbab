"""lemo_ds.megatron: Megatron-core GPT layers with token elimination, against stock Megatron and a masked reference.

- Elimination off (a dense phase of the schedule; or a keep ratio that keeps every block, which runs the whole
  gather / write-back path) equals the stock local layer spec: loss and every gradient.
- Elimination on equals a masked reference built here, independently of lemo_ds's gather and write-back: the
  STOCK layers run on every token, eliminated tokens are removed as keys through the attention mask and their
  outputs replaced by their inputs; block scores (oracle, norm) and RoPE are computed here in float64. Only the
  selection rule (top-k plus forced blocks, tested in test_selection.py) is shared, so that exact ties break alike.
- Packed sequences (PackedSeqParams, thd): Megatron's local DotProductAttention refuses them (Transformer Engine
  attention takes them), so a small varlen attention defined here stands in for it; it is checked against the
  stock attention with a document mask first.
- Activation checkpointing: the recompute reuses the forward's selection, with two micro-batches in flight.
- launch/train_megatron.py runs on two CPU ranks (torchrun, gloo).

On a CPU, Megatron-core's local spec runs under lemo_ds.megatron.megatron_on_cpu (see lemo_ds/megatron/cpu.py for
the three CUDA assumptions it patches); with CUDA the same tests run on the GPU. fp32, small shapes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'lemo_ds[megatron]')")

import torch.distributed as dist  # noqa: E402
from launch_util import REPO, free_port  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.transformer.transformer_layer import TransformerLayer  # noqa: E402

from lemo_ds.config import LEMO_ARTIFACT_RULE  # noqa: E402
from lemo_ds.core.selection import forced_blocks, keep_block_count, select_blocks  # noqa: E402
from lemo_ds.errors import LemoConfigError, LemoInputError  # noqa: E402
from lemo_ds.megatron import (  # noqa: E402
    LemoTransformerLayer,
    attach_lemo,
    get_lemo_block_spec,
    get_lemo_gpt_layer_local_spec,
    lemo_controller,
    lemo_layers,
    megatron_on_cpu,
)

HIDDEN, HEADS, GROUPS, LAYERS, SEQ, BLOCK, VOCAB, BATCH = 64, 4, 2, 4, 128, 16, 256, 2
HEAD_DIM = HIDDEN // HEADS
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Gather / write-back / oracle kernels: Triton on CUDA; on CPU the PyTorch path, as Triton's interpreter (which
# conftest.py turns on for the kernel tests) is slow. One test below runs the Triton path on CPU too.
KERNELS = "auto" if DEVICE.type == "cuda" else "torch"


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    """A world of one (gloo on CPU, NCCL on CUDA) with Megatron's model-parallel groups of size 1."""
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if DEVICE.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    with megatron_on_cpu():
        if DEVICE.type == "cuda":
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
        yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


# ---- models -----------------------------------------------------------------------------------------------------


def transformer_config(**overrides) -> TransformerConfig:
    settings = dict(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,  # grouped-query attention
        ffn_hidden_size=2 * HIDDEN,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def gpt(spec, config: TransformerConfig, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(
        config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    return model.to(DEVICE).train()


def lemo_and_stock(lemo: dict, **config_overrides) -> tuple[GPTModel, GPTModel]:
    """A lemo model and a stock-spec model with the same weights (the sparse layer's parameter names are stock)."""
    config = transformer_config(**config_overrides)
    lemo = {"kernels": KERNELS, **lemo}
    model = gpt(get_lemo_gpt_layer_local_spec(lemo, config=config, normalization="RMSNorm"), config)
    stock = gpt(get_gpt_layer_local_spec(normalization="RMSNorm"), transformer_config(**config_overrides), seed=1)
    stock.load_state_dict(model.state_dict())
    return model, stock


def make_batch(seed: int = 0, docs: bool = False):
    """input ids, labels [b, s], and an attention mask [b, 1, s, s] (True = masked out) or None. With ``docs`` each
    sample packs documents of its own lengths (a block-diagonal causal mask)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    mask = None
    if docs:
        starts = [[0, 37, 70, 101], [0, 20, 90]]  # per sample: different boundaries, none on a block edge
        doc = torch.zeros(BATCH, SEQ, dtype=torch.long)
        for sample, boundaries in enumerate(starts):
            for start in boundaries[1:]:
                doc[sample, start:] += 1
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        mask = ~(causal & (doc[:, :, None] == doc[:, None, :]))[:, None].to(DEVICE)  # [b, 1, s, s]
    return ids.to(DEVICE), labels.to(DEVICE), mask


def loss_and_grads(model: GPTModel, ids, labels, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    position_ids = torch.arange(SEQ, device=DEVICE).expand(BATCH, -1)
    loss = model(ids, position_ids, mask, labels=labels).mean()  # per-token losses [b, s]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(expected, got, **tolerance) -> None:
    loss_a, grads_a = expected
    loss_b, grads_b = got
    torch.testing.assert_close(loss_b, loss_a, **tolerance)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=lambda m, n=name: f"{n}: {m}", **tolerance)


# ---- the independent masked reference ----------------------------------------------------------------------------


def reference_query_key(layer: TransformerLayer, hidden: torch.Tensor):
    """Queries [b, H, s, d] and keys [b, G, s, d] before RoPE, split from linear_qkv's output by hand (Megatron's
    layout: per query group, its heads' queries, then its key, then its value)."""
    seq, batch = hidden.shape[:2]
    mixed = layer.self_attention.linear_qkv(layer.input_layernorm(hidden))[0]  # [s, b, G * (H/G + 2) * d]
    mixed = mixed.view(seq, batch, GROUPS, (HEADS // GROUPS + 2) * HEAD_DIM)
    query, key, _ = mixed.split([HEADS // GROUPS * HEAD_DIM, HEAD_DIM, HEAD_DIM], dim=-1)
    query = query.reshape(seq, batch, HEADS, HEAD_DIM)
    return query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3)


def reference_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d], angles [s, d] (one angle per position and channel): the half-rotation convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def reference_scores(kind: str, layer, hidden, angles, allowed) -> torch.Tensor:
    """[b, n] block scores in float64. hidden [s, b, h]; allowed [b, 1, s, s] bool (True = attends)."""
    seq, batch = hidden.shape[:2]
    n = math.ceil(seq / BLOCK)
    pad = n * BLOCK - seq
    if kind == "norm":
        norms = F.pad(hidden.double().norm(dim=-1).t(), (0, pad))  # [b, n * B]
        sizes = torch.tensor([min(BLOCK, seq - i * BLOCK) for i in range(n)], dtype=torch.float64, device=DEVICE)
        return norms.view(batch, n, BLOCK).sum(-1) / sizes
    query, key = reference_query_key(layer, hidden)
    query, key = reference_rope(query.double(), angles.double()), reference_rope(key.double(), angles.double())
    key = key.repeat_interleave(HEADS // GROUPS, dim=1)  # [b, H, s, d]
    pair = torch.relu(query @ key.transpose(-1, -2) / math.sqrt(HEAD_DIM)).mean(1)  # [b, s, s]
    pair = F.pad(pair * allowed[:, 0], (0, pad, 0, pad))
    return pair.view(batch, n, BLOCK, n, BLOCK).amax(dim=(2, 4)).sum(1)


def reference_kept(scores: torch.Tensor, seq: int, ratio: float) -> torch.Tensor:
    """[b, s] bool of kept tokens, by the contract's rule (default lemo settings: block 0 forced, min 1 block)."""
    n = scores.shape[1]
    forced = forced_blocks(seq, BLOCK, [0])
    blocks = select_blocks(scores, keep_block_count(n, ratio, 1, len(forced)), forced)
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, blocks, True)
    return kept.repeat_interleave(BLOCK, dim=1)[:, :seq]


def reference_layer(layer, hidden, rotary, allowed, kept, granularity="layer") -> torch.Tensor:
    """The stock layer on every token; eliminated tokens are no keys (an eliminated query sees itself, so its
    discarded row stays finite) and their rows are the input (``layer``), or their rows get no attention term and the
    stock MLP sublayer runs on every row (``attention``). hidden [s, b, h], kept [b, s]."""
    eye = torch.eye(hidden.shape[0], dtype=torch.bool, device=DEVICE)
    mask = (allowed & kept[:, None, None, :]) | eye
    if granularity == "attention":
        attended = layer._forward_attention(hidden_states=hidden, attention_mask=~mask, rotary_pos_emb=rotary)[0]
        return layer._forward_mlp(torch.where(kept.t()[:, :, None], attended, hidden))
    out = layer(hidden_states=hidden, attention_mask=~mask, rotary_pos_emb=rotary)[0]  # [s, b, h]
    return torch.where(kept.t()[:, :, None], out, hidden)


def reference_loss_and_grads(stock: GPTModel, ids, labels, mask, ratios, scorer: str, kept_log: dict | None = None,
                             granularity: str = "layer"):
    stock.zero_grad(set_to_none=True)
    position_ids = torch.arange(SEQ, device=DEVICE).expand(BATCH, -1)
    hidden = stock.embedding(input_ids=ids, position_ids=position_ids)  # [s, b, h]
    rotary = stock.rotary_pos_emb(SEQ)  # [s, 1, 1, d] angles
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool, device=DEVICE).tril()[None, None]
    allowed = causal.expand(BATCH, 1, SEQ, SEQ) if mask is None else ~mask  # [b, 1, s, s]
    for index, layer in enumerate(stock.decoder.layers):
        if ratios[index] >= 1.0:
            hidden = layer(hidden_states=hidden, attention_mask=~allowed, rotary_pos_emb=rotary)[0]
            continue
        with torch.no_grad():
            scores = reference_scores(scorer, layer, hidden.detach(), rotary[:, 0, 0], allowed)
        kept = reference_kept(scores, SEQ, ratios[index])
        if kept_log is not None:
            kept_log[index] = kept
        hidden = reference_layer(layer, hidden, rotary, allowed, kept, granularity)
    logits = stock.output_layer(stock.decoder.final_layernorm(hidden))[0]  # [s, b, V]
    loss = F.cross_entropy(logits.float().permute(1, 2, 0), labels, reduction="none").mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in stock.named_parameters()}


# ---- specs ------------------------------------------------------------------------------------------------------


def test_spec_makes_first_half_and_last_layer_dense():
    config = transformer_config()
    spec = get_lemo_gpt_layer_local_spec({"keep_ratio": 0.4}, config=config, normalization="RMSNorm")
    assert [s.module for s in spec.layer_specs] == [TransformerLayer, TransformerLayer, LemoTransformerLayer] + [
        TransformerLayer
    ]
    model = gpt(spec, config)
    assert [type(layer) for layer in model.decoder.layers][2] is LemoTransformerLayer
    assert lemo_controller(model).target_ratios == [1.0, 1.0, 0.4, 1.0]
    listed = get_lemo_gpt_layer_local_spec({"keep_ratio": [1.0, 0.5, 0.4, 1.0]}, LAYERS)
    assert [s.module is LemoTransformerLayer for s in listed.layer_specs] == [False, True, True, False]
    disabled = get_lemo_gpt_layer_local_spec({"enabled": False}, LAYERS)
    assert all(s.module is TransformerLayer for s in disabled.layer_specs)
    assert all(s.module is TransformerLayer for s in get_lemo_gpt_layer_local_spec(None, LAYERS).layer_specs)


@pytest.mark.parametrize(
    "section",
    [{"loss_tokens": "processed"}, {"skipped_loss_weight": 0.0}, {"memory": {"tiled_mlp": True}}, {"memory": {}},
     {"fused_ops": "on"}],
    ids=["loss_tokens", "skipped_loss_weight", "memory", "empty-memory", "fused_ops"],
)
def test_spec_refuses_keys_the_megatron_path_cannot_honour(section):
    with pytest.raises(LemoConfigError, match=f"lemo.{next(iter(section))} is not available for Megatron"):
        get_lemo_gpt_layer_local_spec({"keep_ratio": 0.4, **section}, LAYERS)


def test_keys_a_section_leaves_out_take_lemos_own_rule_on_megatron_layers():
    # The Hugging Face defaults (predictor, processed loss) need what a Megatron model does not have: a section that
    # leaves them out gets LeMo's rule (its keep ratio too); a key written out stays as written; "all" is Megatron's own
    # loss and passes; the predictor, written out, is refused.
    spec = get_lemo_gpt_layer_local_spec({}, LAYERS)
    controller = spec.layer_specs[2].params["lemo_controller"]
    rule = {key: getattr(controller.config, key) for key in LEMO_ARTIFACT_RULE}
    assert rule == LEMO_ARTIFACT_RULE
    assert get_lemo_gpt_layer_local_spec({"keep_ratio": 0.5}, LAYERS).layer_specs[2].params[
        "lemo_controller"].config.keep_ratio == 0.5  # fmt: skip
    assert [s.module is LemoTransformerLayer for s in spec.layer_specs] == [False, False, True, False]
    written = get_lemo_gpt_layer_local_spec({"keep_ratio": 0.5, "loss_tokens": "all", "nested_selection": True}, LAYERS)
    assert written.layer_specs[2].params["lemo_controller"].config.nested_selection
    with pytest.raises(LemoConfigError, match='scorer: "predictor" is not available for Megatron'):
        lemo_and_stock({"keep_ratio": 0.5, "block_size": 8, "scorer": "predictor", "kernels": KERNELS})


def test_nested_selection_keeps_a_subset_of_the_previous_sparse_layer():
    """Selection is the core's (lemo_ds.core.plan): nesting and stratified windows apply to Megatron layers too."""
    lemo = {"keep_ratio": [1.0, 0.5, 0.25, 1.0], "block_size": 8, "scorer": "random", "nested_selection": True,
            "kernels": KERNELS}  # fmt: skip
    model, _ = lemo_and_stock(lemo)
    attach_lemo(model)
    kept = []
    for layer in lemo_layers(model):
        choose = layer._lemo.choose

        def recording(*args, _choose=choose, **kwargs):
            kept.append(_choose(*args, **kwargs))
            return kept[-1]

        layer._lemo.choose = recording
    ids, labels, mask = make_batch(seed=5)
    loss_and_grads(model, ids, labels, mask)
    first, second = kept  # [b, 8], [b, 4] of 16 blocks
    for sample in range(BATCH):
        assert set(second[sample].tolist()) <= set(first[sample].tolist())


# ---- elimination off equals the stock spec ------------------------------------------------------------------------


def test_dense_phase_equals_stock_spec():
    """keep ratio 0.4 in layers 1-2, but step 0 is in the schedule's dense phase: the sparse layers run dense."""
    model, stock = lemo_and_stock({"keep_ratio": [1.0, 0.4, 0.4, 1.0], "schedule": {"dense_steps": 1}})
    controller = attach_lemo(model)
    ids, labels, mask = make_batch()
    got = loss_and_grads(model, ids, labels, mask)
    assert_same(loss_and_grads(stock, ids, labels, mask), got, rtol=0, atol=0)
    assert controller.stats()["keep_ratio_per_layer"] == [1.0] * LAYERS


@pytest.mark.parametrize(
    ("docs", "inplace", "kernels"),
    [(False, True, KERNELS), (True, False, KERNELS), (True, True, "triton")],
    ids=["causal-inplace", "docs-copy", "docs-inplace-triton"],
)
def test_keeping_every_block_equals_stock_spec(docs, inplace, kernels):
    """round(0.97 * 8) = 8 blocks: the sparse path (selection, gathers of rows, angles and mask, write-back) runs
    and keeps every token, so it must give the stock model's loss and gradients."""
    lemo = {"keep_ratio": [1.0, 0.97, 0.97, 1.0], "inplace_writeback": inplace, "kernels": kernels}
    model, stock = lemo_and_stock(lemo)
    controller = attach_lemo(model)
    ids, labels, mask = make_batch(docs=docs)
    got = loss_and_grads(model, ids, labels, mask)
    assert_same(loss_and_grads(stock, ids, labels, mask), got, rtol=1e-5, atol=1e-6)
    assert controller.stats()["keep_ratio_per_layer"] == [1.0] * LAYERS


# ---- elimination on equals the masked reference -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scorer", "docs"), [("oracle", False), ("oracle", True), ("norm", False)], ids=["oracle", "oracle-docs", "norm"]
)
def test_sparse_equals_masked_reference(scorer, docs):
    ratios = [1.0, 0.4, 0.5, 1.0]  # 8 blocks of 16: 3 and 4 kept
    model, stock = lemo_and_stock({"keep_ratio": ratios, "block_size": BLOCK, "scorer": scorer})
    controller = attach_lemo(model)
    ids, labels, mask = make_batch(seed=3, docs=docs)
    got = loss_and_grads(model, ids, labels, mask)
    kept: dict[int, torch.Tensor] = {}
    expected = reference_loss_and_grads(stock, ids, labels, mask, ratios, scorer, kept)
    assert_same(expected, got, rtol=1e-5, atol=1e-6)
    measured = controller.stats()["keep_ratio_per_layer"]
    assert measured == pytest.approx([1.0, 3 / 8, 4 / 8, 1.0])
    if docs or scorer == "norm":  # the samples chose differently: per-sample gathers of rows, angles and masks
        assert any(not torch.equal(kept[index][0], kept[index][1]) for index in (1, 2))


@pytest.mark.parametrize(("scorer", "docs"), [("oracle", False), ("norm", True)], ids=["oracle", "norm-docs"])
def test_attention_granularity_equals_masked_reference(scorer, docs):
    """``eliminate: "attention"``: eliminated tokens skip the attention sublayer only (stock ``_forward_attention`` on
    the kept rows, then the stock ``_forward_mlp`` on every row)."""
    ratios = [1.0, 0.4, 0.5, 1.0]
    section = {"keep_ratio": ratios, "block_size": BLOCK, "scorer": scorer, "eliminate": "attention"}
    model, stock = lemo_and_stock(section)
    controller = attach_lemo(model)
    ids, labels, mask = make_batch(seed=4, docs=docs)
    got = loss_and_grads(model, ids, labels, mask)
    expected = reference_loss_and_grads(stock, ids, labels, mask, ratios, scorer, granularity="attention")
    assert_same(expected, got, rtol=1e-5, atol=1e-6)
    assert controller.stats()["keep_ratio_per_layer"] == pytest.approx([1.0, 3 / 8, 4 / 8, 1.0])


def hugging_face_twin(model: GPTModel):
    """A Hugging Face Llama with the Megatron model's weights (fused q/k/v split per query group, fc1 split into
    gate and up): the same network in the other layout."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=GROUPS, max_position_embeddings=SEQ,
                         rms_norm_eps=model.config.layernorm_epsilon, tie_word_embeddings=False)  # fmt: skip
    twin = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    weights = model.state_dict()
    per_group = HEADS // GROUPS * HEAD_DIM
    with torch.no_grad():
        twin.model.embed_tokens.weight.copy_(weights["embedding.word_embeddings.weight"])
        for index, layer in enumerate(twin.model.layers):
            prefix = f"decoder.layers.{index}."
            qkv = weights[prefix + "self_attention.linear_qkv.weight"].view(GROUPS, per_group + 2 * HEAD_DIM, HIDDEN)
            query, key, value = qkv.split([per_group, HEAD_DIM, HEAD_DIM], dim=1)
            layer.self_attn.q_proj.weight.copy_(query.reshape(-1, HIDDEN))
            layer.self_attn.k_proj.weight.copy_(key.reshape(-1, HIDDEN))
            layer.self_attn.v_proj.weight.copy_(value.reshape(-1, HIDDEN))
            layer.self_attn.o_proj.weight.copy_(weights[prefix + "self_attention.linear_proj.weight"])
            layer.input_layernorm.weight.copy_(weights[prefix + "input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(weights[prefix + "pre_mlp_layernorm.weight"])
            gate, up = weights[prefix + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(weights[prefix + "mlp.linear_fc2.weight"])
        twin.model.norm.weight.copy_(weights["decoder.final_layernorm.weight"])
        twin.lm_head.weight.copy_(weights["output_layer.weight"])
    return twin.to(DEVICE).train()


@pytest.mark.parametrize("eliminate", ["layer", "attention"])
def test_the_two_layouts_agree_on_the_same_weights(eliminate):
    """The sparse step is written once (lemo_ds/core/step.py): the Megatron layout and the Hugging Face layout give
    the same logits and gradients on the same network, input and selection rule (oracle scores, packed into one
    causal row each)."""
    import lemo_ds

    section = {"keep_ratio": [1.0, 0.5, 0.4, 1.0], "block_size": BLOCK, "scorer": "oracle", "eliminate": eliminate,
               "kernels": KERNELS}  # fmt: skip
    model, _ = lemo_and_stock(section)
    controller = attach_lemo(model)
    twin = lemo_ds.apply_lemo(hugging_face_twin(model), section)
    ids, _, _ = make_batch(seed=6)
    weights = torch.randn(BATCH, SEQ, VOCAB, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    position_ids = torch.arange(SEQ, device=DEVICE).expand(BATCH, -1)
    logits = model(ids, position_ids, None)  # [b, s, V]
    (logits * weights).sum().backward()
    twin_logits = twin(input_ids=ids).logits  # [b, s, V]
    (twin_logits * weights).sum().backward()
    torch.testing.assert_close(twin_logits, logits, atol=2e-4, rtol=1e-4)
    assert controller.stats() == lemo_ds.get_controller(twin).stats()
    pairs = [(twin.model.embed_tokens, model.embedding.word_embeddings), (twin.lm_head, model.output_layer)]
    for index in range(LAYERS):
        mine, theirs = twin.model.layers[index], model.decoder.layers[index]
        pairs += [(mine.self_attn.o_proj, theirs.self_attention.linear_proj),
                  (mine.mlp.down_proj, theirs.mlp.linear_fc2)]
    for hf_module, megatron_module in pairs:
        torch.testing.assert_close(hf_module.weight.grad, megatron_module.weight.grad, atol=2e-4, rtol=1e-3)


# ---- packed sequences (thd) ---------------------------------------------------------------------------------------


class VarlenAttention(torch.nn.Module):
    """Causal attention within the documents of a packed (thd) row: what Transformer Engine's attention computes,
    in plain torch, because Megatron's local DotProductAttention refuses packed sequences."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **kwargs):
        super().__init__()
        self.scale = softmax_scale or config.kv_channels**-0.5

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        tokens, heads, _ = query.shape  # [t, H, d]; key, value [t, G, d]
        cu = packed_seq_params.cu_seqlens_q.tolist()
        self.last_cu_seqlens = cu
        doc = torch.zeros(tokens, dtype=torch.long, device=query.device)
        for start in cu[1:-1]:
            doc[start:] += 1
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).tril()
        allowed = causal & (doc[:, None] == doc[None, :])  # [t, t]
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
        scores = torch.einsum("qhd,khd->hqk", query, key) * self.scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("hqk,khd->qhd", probs, value).reshape(tokens, -1)  # [t, H * d]


def varlen_layer_spec():
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = VarlenAttention
    return spec


def test_packed_thd_equals_masked_reference():
    lengths = [50, 7, 45, 26]  # 128 tokens; blocks of 16 straddle documents; the 7-token one may vanish
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    tokens = sum(lengths)
    cu = torch.tensor([0, *[s + n for s, n in zip(starts, lengths, strict=True)]], dtype=torch.int32, device=DEVICE)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths)
    )
    config = transformer_config(num_layers=2)
    rope = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, use_cpu_initialization=True)
    table = rope(max(lengths)).to(DEVICE)  # [max_s, 1, 1, d]: what GPTModel passes with packed sequences
    # Reference positions, by hand: the offset of each token in its document.
    positions = torch.tensor([i for n in lengths for i in range(n)], device=DEVICE)
    per_token = table[positions]  # [t, 1, 1, d]
    doc = torch.tensor([d for d, n in enumerate(lengths) for _ in range(n)], device=DEVICE)
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=DEVICE).tril()
    allowed = (causal & (doc[:, None] == doc[None, :]))[None, None]  # [1, 1, t, t]

    torch.manual_seed(0)
    lemo = {"keep_ratio": [1.0, 0.4], "block_size": BLOCK, "kernels": KERNELS}
    lemo_spec = get_lemo_block_spec(varlen_layer_spec(), lemo, 2)
    sparse = build_module(lemo_spec.layer_specs[1], config=config, layer_number=2).to(DEVICE)
    varlen = build_module(varlen_layer_spec(), config=config, layer_number=2).to(DEVICE)
    stock = build_module(get_gpt_layer_local_spec(normalization="RMSNorm"), config=config, layer_number=2).to(DEVICE)
    varlen.load_state_dict(sparse.state_dict())
    stock.load_state_dict(sparse.state_dict())
    hidden = torch.randn(tokens, 1, HIDDEN, device=DEVICE)
    weight = torch.randn(tokens, 1, HIDDEN, device=DEVICE)

    def run(layer, **kwargs):
        return _run_callable(lambda hidden_states: layer(hidden_states=hidden_states, **kwargs), layer, hidden, weight)

    # The stand-in attention in thd equals the stock attention with a document mask and per-document positions.
    dense = run(stock, attention_mask=~allowed, rotary_pos_emb=per_token)
    _assert_runs_close(dense, run(varlen, attention_mask=None, rotary_pos_emb=table, packed_seq_params=params))

    got = run(sparse, attention_mask=None, rotary_pos_emb=table, packed_seq_params=params)
    with torch.no_grad():
        scores = reference_scores("oracle", stock, hidden, per_token[:, 0, 0], allowed)
    kept = reference_kept(scores, tokens, 0.4)  # [1, t]
    expected = _run_callable(
        lambda hidden_states: reference_layer(stock, hidden_states, per_token, allowed, kept), stock, hidden, weight
    )
    _assert_runs_close(expected, got)
    # The documents the attention saw: each one's kept tokens, documents with none dropped.
    per_doc = [int(n) for n in torch.bincount(doc[kept[0]], minlength=len(lengths)) if n > 0]
    assert sparse.self_attention.core_attention.last_cu_seqlens == [sum(per_doc[:i]) for i in range(len(per_doc) + 1)]
    assert sparse._lemo.controller.stats()["keep_ratio_per_layer"][1] == pytest.approx(int(kept.sum()) / tokens)


def _run_callable(forward, layer, hidden, weight):
    layer.zero_grad(set_to_none=True)
    x = hidden.clone().requires_grad_()
    out = forward(hidden_states=x)
    out = out[0] if isinstance(out, tuple) else out
    (out * weight).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in layer.named_parameters()}


def _assert_runs_close(expected, got) -> None:
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ---- activation checkpointing -----------------------------------------------------------------------------------


def test_full_recompute_reuses_the_forward_selection():
    """Random scorer (a new draw every forward) and two micro-batches in flight before their backward passes, as
    a pipeline schedule runs them: the recompute must take each forward's own selection back."""
    lemo = {"keep_ratio": [1.0, 0.4, 0.4, 1.0], "block_size": BLOCK, "scorer": "random", "kernels": KERNELS}
    recompute = transformer_config(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    checkpointed = gpt(get_lemo_gpt_layer_local_spec(lemo, config=recompute, normalization="RMSNorm"), recompute)
    config = transformer_config()
    reference = gpt(get_lemo_gpt_layer_local_spec(lemo, config=config, normalization="RMSNorm"), config, seed=1)
    reference.load_state_dict(checkpointed.state_dict())
    results = []
    for model in (reference, checkpointed):
        attach_lemo(model)
        model.zero_grad(set_to_none=True)
        position_ids = torch.arange(SEQ, device=DEVICE).expand(BATCH, -1)
        losses = []
        for seed in (5, 6):  # two forwards, then the two backwards
            ids, labels, _ = make_batch(seed=seed)
            losses.append(model(ids, position_ids, None, labels=labels).mean())
        for loss in losses:
            loss.backward()
        results.append((torch.stack(losses).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert all(len(layer._lemo.cache) == 0 for layer in lemo_layers(model))
    assert_same(results[0], results[1], rtol=1e-5, atol=1e-6)


# ---- input checks -------------------------------------------------------------------------------------------------


def test_sequence_shorter_than_a_block_is_refused():
    model, _ = lemo_and_stock({"keep_ratio": [1.0, 0.4, 0.4, 1.0], "block_size": 256})
    ids, labels, _ = make_batch()
    with pytest.raises(LemoInputError, match="shorter than one lemo block"):
        model(ids, torch.arange(SEQ, device=DEVICE).expand(BATCH, -1), None, labels=labels)


# ---- the training example ---------------------------------------------------------------------------------------


def test_train_megatron_two_ranks(tmp_path):
    """launch/train_megatron.py on two ranks through torchrun (gloo on CPU)."""
    out = tmp_path / "run"
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(PYTHONUNBUFFERED="1", TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    if torch.cuda.device_count() < 2:  # two ranks need two GPUs; with fewer, two CPU ranks
        environment["CUDA_VISIBLE_DEVICES"] = ""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "train_megatron.py"),
        "--steps",
        "3",
        "--seq-len",
        "128",
        "--block-size",
        "16",
        "--output-dir",
        str(out),
    ]
    result = subprocess.run(command, cwd=REPO, env=environment, text=True, capture_output=True, timeout=240)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert all(math.isfinite(loss) for loss in summary["losses"])
    ratios = summary["keep_ratio_per_layer"]
    assert ratios[0] == 1.0 and ratios[-1] == 1.0 and min(ratios) < 0.6
    assert summary["lemo"]["scorer"] == "oracle" and summary["lemo"]["loss_tokens"] == "all"  # LeMo's rule here


def test_train_megatron_refuses_hugging_face_keys_in_one_line():
    """The main job's config names the processed loss, which a Megatron model cannot honour: one error line, exit 2,
    before Megatron is imported (no traceback)."""
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train_megatron.py"), "--lemo",
                             str(REPO / "ds_configs" / "zero3_lemo.json"), "--steps", "1"],
                            cwd=REPO, text=True, capture_output=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "lemo_ds: error: lemo.loss_tokens is not available for Megatron-core layers" in result.stderr
    assert "Traceback" not in result.stderr
