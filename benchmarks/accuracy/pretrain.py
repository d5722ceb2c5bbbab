"""Pretrain the reference model (a small Llama) on the train books at the short context, then derive the
context-extended model (RoPE scaling, linear or YaRN): two Hugging Face model directories with the tokenizer.

Plain PyTorch on one device: random windows of ``short_seq`` tokens from the concatenated train books (documents
joined by </s><s>), ``recipe.pretrain_passkey_rate`` of them replaced by passkey documents and
``recipe.pretrain_induction_rate`` by one repeated segment (induction_row), AdamW, linear warm-up then cosine
decay to 10%, bf16 autocast on CUDA.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.accuracy import passkey
from benchmarks.accuracy.recipe import Recipe


def tokenize_books(tokenizer, books: list[Path]) -> np.ndarray:
    """All books as one id stream, each book as <s> ids </s>: [n] int32."""
    texts = [path.read_text(encoding="utf-8") for path in books]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    parts = [np.asarray([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id], np.int32) for ids in encoded]
    return np.concatenate(parts)


def llama_config(recipe: Recipe, tokenizer):
    """The reference model's config, built like the harness's shapes, at the short context."""
    from benchmarks.harness.shapes import ModelShape

    shape = ModelShape(f"accuracy-{recipe.name}", hidden=recipe.hidden_size, layers=recipe.layers,
                       heads=recipe.heads, kv_heads=recipe.kv_heads, intermediate=recipe.intermediate_size,
                       vocab=recipe.vocab_size, rope_theta=recipe.rope_theta,
                       max_positions=recipe.short_seq)  # fmt: skip
    # use_cache stays Hugging Face's default (true), as the reference model's config.json always had it: the
    # extended model, the fine-tuning runs and the perplexities all read that file.
    return shape.to_config(recipe.short_seq, use_cache=True, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def pretrain(recipe: Recipe, tokenizer, train_ids: np.ndarray, device: torch.device, log) -> torch.nn.Module:
    """The reference model after ``recipe.pretrain_steps`` steps (fp32 weights, training mode off)."""
    # Bitwise repeatable on one kind of GPU: a cached reference model is then the one every machine would train.
    # Without this, three H200 pretrainings of one recipe gave extended-model perplexities of 177, 197 and 203,
    # and lemo's gap to dense at keep 0.4 moved between 2.2% and 5.6% with them (accuracy-experiments).
    # cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts, so run.py sets it before any CUDA work too.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(recipe.deterministic_pretraining)
    try:
        return _pretrain(recipe, tokenizer, train_ids, device, log)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _pretrain(recipe: Recipe, tokenizer, train_ids: np.ndarray, device: torch.device, log) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM._from_config(llama_config(recipe, tokenizer), attn_implementation="sdpa").to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.pretrain_lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )

    def lr_at(step: int) -> float:
        if step < recipe.pretrain_warmup:
            return recipe.pretrain_lr * (step + 1) / recipe.pretrain_warmup
        progress = (step - recipe.pretrain_warmup) / max(recipe.pretrain_steps - recipe.pretrain_warmup, 1)
        return recipe.pretrain_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = np.random.default_rng(recipe.seed)
    stream = torch.from_numpy(train_ids.astype(np.int64))
    window = recipe.short_seq
    # Passkey and induction rows draw from streams of their own, so a recipe without them pretrains exactly as
    # before. Induction rows replace book rows only: their draw is conditioned on the row not being a passkey row.
    passkey_rng = np.random.default_rng([recipe.seed, 2])
    induction_rng = np.random.default_rng([recipe.seed, 3])
    induction_given_book = recipe.pretrain_induction_rate / (1.0 - recipe.pretrain_passkey_rate)
    books = stream.numpy() if recipe.pretrain_induction_source == "books" else None  # induction segments' source

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    started, last = time.perf_counter(), 0.0
    model.train()
    for step in range(recipe.pretrain_steps):
        starts = torch.from_numpy(rng.integers(0, len(stream) - window, size=recipe.pretrain_batch))
        batch = torch.stack([stream[s : s + window] for s in starts.tolist()])  # [b, s]
        is_passkey = np.zeros(recipe.pretrain_batch, bool)
        if recipe.pretrain_passkey_rate > 0:
            is_passkey = passkey_rng.random(recipe.pretrain_batch) < recipe.pretrain_passkey_rate
            for row in np.flatnonzero(is_passkey):
                ids = passkey.pretraining_row(encode, stream.numpy(), passkey_rng, window, tokenizer.bos_token_id)
                batch[row] = torch.from_numpy(ids)
        if recipe.pretrain_induction_rate > 0:
            is_induction = ~is_passkey & (induction_rng.random(recipe.pretrain_batch) < induction_given_book)
            for row in np.flatnonzero(is_induction):
                ids = induction_row(induction_rng, window, max(tokenizer.all_special_ids) + 1, recipe.vocab_size,
                                    tokenizer.bos_token_id, books)  # fmt: skip
                batch[row] = torch.from_numpy(ids)
        batch = batch.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        if step == recipe.pretrain_steps - 1 or now - last > 15:
            last = now
            log(f"pretrain step {step + 1}/{recipe.pretrain_steps}: loss {loss.item():.3f} ({now - started:.0f} s)")
    return model.eval()


def induction_row(rng: np.random.Generator, length: int, low: int, high: int, bos_id: int | None,
                  books: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """One pretraining row of exactly ``length`` tokens: [BOS] then one segment, of a random length between 8 and half
    the row, repeated until the row is full: [length]. The segment is uniform random ids in [low, high), or with
    ``books`` (a token stream) a random window of it. From the segment's second copy on, every token is predictable
    by finding its previous occurrence and copying what followed: the induction circuit a model needs to retrieve a
    passkey, which books alone did not teach a small model in the pretraining budget
    (benchmarks/results/accuracy-20261202-round2). Book windows make the copied tokens the text's own, frequent ones
    first, where uniform ids over the whole vocabulary give each id too few occurrences per step (see
    recipe.pretrain_induction_source)."""
    head = np.asarray([bos_id] if bos_id is not None else [], np.int64)
    body = length - len(head)
    if body < 16:
        raise ValueError(f"an induction row of {length} tokens has no room for two copies of an 8-token segment")
    size = int(rng.integers(8, body // 2 + 1))
    if books is None:
        segment = rng.integers(low, high, size=size)  # [m]
    else:
        if len(books) <= size:
            raise ValueError(f"a token stream of {len(books)} tokens holds no induction segment of {size}")
        start = int(rng.integers(0, len(books) - size))
        segment = books[start : start + size].astype(np.int64)  # [m]
    return np.concatenate([head, np.resize(segment, body)])  # [length]


def save_reference(model, tokenizer, out: Path, recipe: Recipe, meta: dict) -> None:
    """The reference model directory (bf16 weights, tokenizer, recipe), written under a temporary name and
    renamed, so an interrupted run never leaves a half-written model that a later run would trust."""
    tmp = out.with_name(out.name + ".tmp")
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "lemo_accuracy.json").write_text(json.dumps({"reference_key": recipe.reference_key(), **meta}, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def write_extended(reference: Path, out: Path, recipe: Recipe) -> None:
    """The same weights with RoPE scaling by ``recipe.extension`` (``recipe.rope_scaling``: position
    interpolation or YaRN): the model that the fine-tuning runs start from."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(reference, tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["rope_parameters"] = rope_parameters(recipe)
    config["max_position_embeddings"] = recipe.long_seq
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def rope_parameters(recipe: Recipe) -> dict:
    """The extended model's ``rope_parameters`` (Hugging Face config) for ``recipe.rope_scaling``."""
    parameters = {"rope_type": recipe.rope_scaling, "factor": float(recipe.extension), "rope_theta": recipe.rope_theta}
    if recipe.rope_scaling == "yarn":
        # YaRN's ramp is measured against the pretraining context; HF's defaults for the rest (beta_fast 32,
        # beta_slow 1, attention factor 0.1 ln(factor) + 1).
        parameters["original_max_position_embeddings"] = recipe.short_seq
    return parameters


def reference_is_cached(out: Path, recipe: Recipe) -> bool:
    meta = out / "lemo_accuracy.json"
    return meta.is_file() and json.loads(meta.read_text()).get("reference_key") == recipe.reference_key()


@torch.no_grad()
def perplexity(model_dir: Path, books: list[Path], seq_len: int, rows: int, device: torch.device, seed: int) -> float:
    """Dense perplexity of a model directory on ``rows`` held-out rows of ``seq_len`` tokens, packed exactly as
    launch/train.py's --eval-data packs them (same function and seed), so the figures compare."""
    from transformers import AutoModelForCausalLM

    from lemo_ds.training import data
    from lemo_ds.training.tokenizer import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(model_dir)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    loss_sum, tokens = 0.0, 0
    for row in data.heldout_rows(books, tokenizer, seq_len, seed, limit=rows):
        batch = {k: torch.from_numpy(getattr(row, k))[None].to(device) for k in ("input_ids", "labels", "position_ids")}
        counted = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(model(**batch).loss) * counted
        tokens += counted
    return math.exp(loss_sum / tokens)
