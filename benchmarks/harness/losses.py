"""The training losses the variants compare.

- ``hf``: Hugging Face's own loss, ``model(input_ids, labels=labels).loss``: full [seq, vocab] logits in the
  model dtype, upcast to float32, cross-entropy of token t+1 from position t, mean over the counted tokens.
- ``chunked``: the same loss without ever holding full [seq, vocab] logits: the LM head and the cross-entropy
  run over chunks of positions, and the gradient of each chunk is computed right away (as Liger-Kernel's fused
  linear cross-entropy does). On CUDA with liger-kernel installed it is Liger's
  ``liger_fused_linear_cross_entropy``; elsewhere ``TorchChunkedLinearCrossEntropy`` below, plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from lemo_ds.memory.segment_loss import IGNORE_INDEX, liger_installed

LOSS_IMPLS = ("auto", "liger", "torch")


class TorchChunkedLinearCrossEntropy(torch.autograd.Function):
    """PyTorch fallback of the fused linear cross-entropy: mean CE of ``hidden @ weight.T`` against ``targets``.

    Exact vs Hugging Face's loss: each chunk's logits are computed in the weight dtype and upcast to float32 (as
    HF does), the loss is the sum over counted tokens divided by their number, and the gradient (softmax minus
    one-hot, divided by the count, in float32) is cast to the model dtype before the matmuls, which is the order
    autograd takes through HF's ``logits.float()``. Working memory: one [chunk, vocab] float32 block.
    The gradients are computed in forward and held until backward (grad_hidden [N, h], grad_weight [V, h] only
    when the LM head is trained), so backward is a scaling.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                ignore_index: int) -> torch.Tensor:
        # hidden [N, h], weight [V, h], targets [N]
        counted = targets != ignore_index  # [N]
        count = counted.sum()
        scale = 1.0 / count.clamp_min(1).to(torch.float32)  # HF: sum / count (nan when nothing is counted)
        need_hidden = ctx.needs_input_grad[0]
        need_weight = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, h]
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None  # [V, h]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            chunk = hidden[start:end]  # [c, h]
            logits = (chunk @ weight.t()).float()  # [c, V]
            target = targets[start:end].clamp_min(0)  # [c]; ignored rows masked below
            mask = counted[start:end]  # [c]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            picked = logits.gather(1, target[:, None])[:, 0]  # [c]
            loss_sum += ((lse - picked) * mask).sum()
            if need_hidden or need_weight:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place [c, V]
                probs.scatter_add_(1, target[:, None], -mask[:, None].to(probs.dtype))  # minus one-hot
                probs.mul_((mask.to(probs.dtype) * scale)[:, None])  # dLoss/dlogits in float32 [c, V]
                grad_logits = probs.to(hidden.dtype)  # [c, V], as autograd casts back through .float()
                if need_hidden:
                    grad_hidden[start:end] = grad_logits @ weight  # [c, h]
                if need_weight:
                    grad_weight += grad_logits.t().float() @ chunk.float()  # [V, h]
        loss = loss_sum / count.to(torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def torch_chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                       chunk_tokens: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return TorchChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, ignore_index)


def resolve_chunked_impl(requested: str, device: torch.device) -> str:
    """``liger`` on CUDA when liger-kernel imports (or when asked for), else ``torch``."""
    if requested not in LOSS_IMPLS:
        raise ValueError(f"unknown chunked-loss implementation {requested!r}; choose one of {LOSS_IMPLS}")
    if requested == "auto":
        return "liger" if device.type == "cuda" and liger_installed() else "torch"
    return requested


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets of every position [b, s]: the next token, and IGNORE_INDEX at the last position (as HF's
    ForCausalLMLoss pads and shifts), so the hidden states need no slicing copy."""
    ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)  # [b, 1]
    return torch.cat([labels[:, 1:], ignore], dim=1)  # [b, s]


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, impl: str,
                 chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token CE from the final hidden states [b, s, h] and the LM head weight [V, h]."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [b*s, h], a view (hidden is contiguous)
    targets = shift_targets(labels).reshape(-1)  # [b*s]
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(flat_hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                                reduction="mean")
    return torch_chunked_linear_cross_entropy(flat_hidden, weight, targets, chunk_tokens)


def final_hidden_states(causal_lm_call, decoder: nn.Module, inputs: torch.Tensor | dict) -> torch.Tensor:
    """Final hidden states [b, s, h] from a forward of the whole model that computes the logits of the last
    position only (``logits_to_keep=1``: one [b, 1, V] row, not [b, s, V]).

    The whole model is called rather than the decoder alone, so that every hook of a training forward runs
    (peft's, and lemo_ds's forward pre-hook on the causal LM, which advances its step counter and counts the
    dense layers' tokens); a forward hook on the decoder hands back its last hidden state. ``inputs``: the input
    ids [b, s], or the call's keyword arguments (input ids and position ids).
    """
    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, output) -> None:
        captured["hidden"] = output.last_hidden_state  # [b, s, h]

    handle = decoder.register_forward_hook(grab)
    try:
        inputs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
        causal_lm_call(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured.pop("hidden")


def check_chunked_loss(model: nn.Module, decoder: nn.Module, lm_head_weight: torch.Tensor, input_ids: torch.Tensor,
                       impl: str) -> dict[str, float | str | int]:
    """HF's loss and the chunked loss on the same weights and tokens (no grad): a check, recorded in the result,
    that the chunked implementation in use computes the same loss (Liger's kernel cannot run on CPU tests)."""
    with torch.no_grad():
        hf = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.float().item()
        hidden = final_hidden_states(model, decoder, input_ids)  # [1, s, h]
        chunked = chunked_loss(hidden, lm_head_weight, input_ids, impl).float().item()
    return {"impl": impl, "seq": input_ids.shape[1], "hf_loss": hf, "chunked_loss": chunked,
            "abs_diff": abs(hf - chunked)}
