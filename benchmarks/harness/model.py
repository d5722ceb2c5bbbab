"""Build the benchmarked model once per shape: random init, directly on the device, LoRA r=8 on q/k/v/o.

The model is created under ``with torch.device(device)`` in the target dtype, so an 8B model is never
materialised on the CPU first; Hugging Face's own init (normal_(0, 0.02) for linear and embedding weights,
ones for RMSNorm) then runs on the GPU, which takes a fraction of a second. LoRA adapters come from peft with
its defaults, which keep the adapters in float32 on a bf16 base model (``autocast_adapter_dtype=True``): that is
what a plain ``get_peft_model`` user trains with and what the GPU.md baselines were measured with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from benchmarks.harness.shapes import ModelShape

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass
class BenchModel:
    """One model object that every variant of a configuration runs on (variants switch it in place)."""

    shape: ModelShape
    model: nn.Module  # the peft model (PeftModelForCausalLM)
    device: torch.device
    dtype: torch.dtype
    lora_rank: int
    optimizer: torch.optim.Optimizer
    build_s: float
    active_variant: object = None  # the Variant the model is currently switched to (harness.variants)
    info: dict = field(default_factory=dict)

    @property
    def causal_lm(self) -> nn.Module:
        """The Hugging Face LlamaForCausalLM inside peft."""
        return self.model.get_base_model()

    @property
    def decoder(self) -> nn.Module:
        """The base decoder (LlamaModel): embeddings, decoder layers, final norm."""
        return self.causal_lm.model

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.causal_lm.lm_head.weight  # [vocab, hidden]


LORA_ADAPTER_DTYPES = ("fp32", "model")


def build_model(shape: ModelShape, max_seq: int, device: torch.device, dtype: torch.dtype, lora_rank: int = 8,
                seed: int = 0, lora_adapters: str = "fp32") -> BenchModel:
    """``lora_adapters``: "fp32" (peft's default for a bf16 base: float32 adapters, and each adapter casts its
    input to float32, which costs activation memory) or "model" (adapters in the model dtype)."""
    if lora_adapters not in LORA_ADAPTER_DTYPES:
        raise ValueError(f"lora_adapters must be one of {LORA_ADAPTER_DTYPES}, got {lora_adapters!r}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    config = shape.to_config(max_seq)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora, autocast_adapter_dtype=lora_adapters == "fp32")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Plain torch AdamW over the LoRA parameters; its step is part of every timed training step.
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - start
    info = {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in trainable),
        "lora": {"rank": lora_rank, "alpha": 2 * lora_rank, "dropout": 0.0, "targets": list(LORA_TARGETS),
                 "adapter_dtype": str(trainable[0].dtype).removeprefix("torch.")},
        "attn_implementation": base.config._attn_implementation,
        "dtype": str(dtype).removeprefix("torch."),
        "max_position_embeddings": config.max_position_embeddings,
        "build_s": round(build_s, 3),
        "optimizer": "torch.optim.AdamW(lr=1e-4) over the LoRA parameters, step included in the timed step",
    }
    return BenchModel(shape, model, device, dtype, lora_rank, optimizer, build_s, info=info)


@dataclass
class Batch:
    """One training row (batch 1)."""

    input_ids: torch.Tensor  # [1, s]
    labels: torch.Tensor  # [1, s]; -100 where a document starts (no target across documents)
    position_ids: torch.Tensor | None  # [1, s], restarting at every document; None: one document
    documents: int

    def inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments a model call takes for this row (besides labels)."""
        inputs = {"input_ids": self.input_ids}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs


def random_batch(vocab: int, seq: int, device: torch.device, seed: int = 0, documents: int = 1) -> Batch:
    """Random token ids [1, seq] and labels = input_ids. Memory and time do not depend on the token values; the
    loss is that of random data (about ln(vocab)), useful only as a sanity check between variants.

    ``documents`` > 1: a packed row, as the main job's data makes them: the documents' lengths vary (cut points
    drawn uniformly over the row, as files of many sizes pack), position ids restart at every document, and the
    first token of a document is no target of the one before it."""
    if not 1 <= documents <= seq:
        raise ValueError(f"documents per row must be in [1, {seq}], got {documents}")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (1, seq), generator=generator)  # [1, s]
    labels = input_ids.clone()
    position_ids = None
    if documents > 1:
        starts = torch.randperm(seq - 1, generator=generator)[: documents - 1].sort().values + 1  # [docs - 1]
        lengths = torch.diff(torch.cat([torch.zeros(1, dtype=torch.long), starts, torch.tensor([seq])]))  # [docs]
        position_ids = torch.cat([torch.arange(int(n)) for n in lengths])[None]  # [1, s]
        labels[0, starts] = -100
        position_ids = position_ids.to(device)
    return Batch(input_ids.to(device), labels.to(device), position_ids, documents)
