"""Model FLOPs of one training step, counted from the tokens each decoder layer really processed, and MFU.

For batch b, sequence s, and decoder layer l that processed T_l = r_l * s tokens per sequence (r_l: the
share lemo_ds's controller measured, ``keep_ratio_per_layer``; 1.0 for every layer of a dense variant)::

    P      = h*(H*d) + 2*h*(KV*d) + (H*d)*h + 3*h*f           matmul weights of one layer (q, k, v, o, MLP)
    P_lora = sum over adapted projections of r*(in + out)      LoRA weights of one layer
    F_l    = c*P*T_l + 6*P_lora*T_l + 6*H*d*T_l^2              per sequence, forward + backward
    F_head = c*h*V*s                                           LM head (the loss itself is not counted)
    F      = b * (sum_l F_l + F_head)
    MFU    = F / step_seconds / peak_flops

with h hidden, f intermediate, H query heads, KV key/value heads, d head dim, V vocab. ``c`` is 6 for the
usual "6 x params x tokens" convention (forward 2, backward 4: gradients of inputs and of weights); that is
``mfu``. Under LoRA the base weights are frozen, so the weight gradients of the base matmuls are never
computed and only c = 4 FLOPs per weight and token are needed: ``mfu_frozen`` counts that (lower, and closer
to the work the GPU does). The attention term is causal attention among the T_l kept tokens: forward
QK^T and PV are 2 * 2*T^2*H*d, halved by causality, and backward is twice the forward, so 3 * 2*T^2*H*d.
Not counted (model FLOPs, not hardware FLOPs): recomputation under activation checkpointing, the lemo
scorers (oracle Q.K scoring, norms), norms, RoPE, softmax, element-wise ops, the optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.harness.shapes import ModelShape

# NVIDIA H200 (SXM): dense BF16 tensor-core peak, 989 TFLOP/s (the 1979 figure of the datasheet is with
# 2:4 sparsity). The same as the H100 SXM.
H200_BF16_DENSE_PEAK = 989e12
PEAK_FLOPS_BY_GPU = {"H200": H200_BF16_DENSE_PEAK, "H100": H200_BF16_DENSE_PEAK}


def peak_flops_for(gpu_name: str | None) -> float | None:
    """Dense BF16 peak of a known GPU by its name, else None (MFU is then not reported)."""
    if not gpu_name:
        return None
    for key, peak in PEAK_FLOPS_BY_GPU.items():
        if key in gpu_name:
            return peak
    return None


def layer_weight_params(shape: ModelShape) -> int:
    """P: matmul weights of one decoder layer."""
    h, d = shape.hidden, shape.head_dim
    return h * shape.heads * d + 2 * h * shape.kv_heads * d + shape.heads * d * h + 3 * h * shape.intermediate


def layer_lora_params(shape: ModelShape, rank: int) -> int:
    """P_lora: LoRA r on q, k, v, o of one layer: r * (in + out) per projection."""
    h, d = shape.hidden, shape.head_dim
    q = rank * (h + shape.heads * d)
    kv = 2 * rank * (h + shape.kv_heads * d)
    o = rank * (shape.heads * d + h)
    return q + kv + o


def step_flops(shape: ModelShape, seq: int, keep_ratio_per_layer: Sequence[float], lora_rank: int,
               batch: int = 1) -> dict[str, float]:
    """Model FLOPs of one forward + backward (see the module docstring). Returns both conventions and parts."""
    if len(keep_ratio_per_layer) != shape.layers:
        raise ValueError(f"{len(keep_ratio_per_layer)} keep ratios for a model with {shape.layers} layers")
    weights = layer_weight_params(shape)
    lora = layer_lora_params(shape, lora_rank)
    tokens = [ratio * seq for ratio in keep_ratio_per_layer]  # T_l per sequence
    linear_tokens = sum(tokens)
    attention = sum(6 * shape.heads * shape.head_dim * t * t for t in tokens)
    lora_flops = 6 * lora * linear_tokens
    head_tokens = shape.hidden * shape.vocab * seq
    parts = {
        "linear_6": 6 * weights * linear_tokens,
        "linear_frozen": 4 * weights * linear_tokens,
        "lora": lora_flops,
        "attention": attention,
        "lm_head_6": 6 * head_tokens,
        "lm_head_frozen": 4 * head_tokens,
    }
    return {
        "model_flops": batch * (parts["linear_6"] + lora_flops + attention + parts["lm_head_6"]),
        "model_flops_frozen": batch * (parts["linear_frozen"] + lora_flops + attention + parts["lm_head_frozen"]),
        "tokens_processed_by_layers": batch * linear_tokens,
        **{f"part_{key}": batch * value for key, value in parts.items()},
    }


def mfu(flops: float, step_s: float | None, peak: float | None) -> float | None:
    if not step_s or not peak:
        return None
    return flops / step_s / peak


def row_flops(shape: ModelShape, doc_lengths: Sequence[int], lora_rank: int) -> dict[str, float]:
    """What the GPU computes for one packed row in a dense LoRA step with activation checkpointing, the same figure
    for every job run on that row (so a job's TFLOP/s on it compares with another's as the inverse of their times):

        F = sum_l [6*P*T + 6*P_lora*T + 8*H*d*sum_docs n^2] + 4*h*V*T

    T tokens of the row, n each document's length. Base matmuls: forward, recompute, input gradient (2 FLOPs per
    weight and token each; frozen weights get no weight gradient). Attention: causal within each document (forward
    2*n^2*H*d, recompute the same, backward twice it). LM head: forward and input gradient (a fused linear
    cross-entropy computes both in one pass). A sparse job does less work on the same row: its TFLOP/s is then
    dense-equivalent. Norms, RoPE, elementwise ops and scorers are not counted."""
    tokens = sum(doc_lengths)
    attention = 8 * shape.heads * shape.head_dim * sum(n * n for n in doc_lengths)
    per_layer = 6 * layer_weight_params(shape) * tokens + 6 * layer_lora_params(shape, lora_rank) * tokens + attention
    head = 4 * shape.hidden * shape.vocab * tokens
    return {"flops": shape.layers * per_layer + head, "attention_flops": shape.layers * attention, "tokens": tokens,
            "documents": len(doc_lengths)}
