"""Segment-based loss: the LM head and the cross-entropy over segments of the sequence.

Hugging Face's causal-LM loss materialises the logits [b, s, V] in the model dtype, a float32 copy, and the
float32 softmax gradient: at 128K tokens and Llama-3's 128256-token vocabulary that is tens of GiB, the
"logits spike" LeMo cuts by segmenting. Here the loss is computed segment by segment and nothing of size
[s, V] ever exists:

- ``torch`` (everywhere, ZeRO-3 included): forward computes each segment's logits and cross-entropy under
  ``no_grad`` and keeps only the sum; backward recomputes each segment's logits with autograd on and
  back-propagates it at once (one segment's [segment, V] float32 block alive at a time). The LM head is
  called as a module, so ZeRO-3 gathers its partitioned weight and reduces its gradient as usual; its
  gradient is computed in backward, so loss scaling and gradient accumulation apply to it normally.
- ``liger``: Liger-Kernel's fused linear cross-entropy, which does the same in Triton kernels and computes the
  gradients in its forward (no recomputed LM head). It is called inside the LM head's own module call, so that
  under ZeRO-3 DeepSpeed's hooks gather the partitioned weight for it and, where the head trains, take its
  gradient back, as for any module.

Exactly Hugging Face's loss: labels shifted left by one with -100 appended (the last position predicts
nothing), -100 ignored, logits upcast to float32, the sum over counted positions divided by their number (or
by ``num_items_in_batch`` when the caller gives it, as the Trainer does under gradient accumulation).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from lemo_ds.kernels.dispatch import triton_usable

IGNORE_INDEX = -100
IMPLEMENTATIONS = ("auto", "liger", "torch")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[b, s] targets of each position: the next token's label, -100 at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


_shift = shift_labels  # segment_lm_loss's argument of the same name shadows it


def hf_causal_lm_loss_ref(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Reference: Hugging Face's loss from full logits [b, s, V] (for tests)."""
    targets = shift_labels(labels).reshape(-1)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                           reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def _set_grad_ready(params: list[nn.Parameter], ready: bool) -> None:
    # ZeRO reduces a parameter's gradient when its hook fires; while segments are still adding to it, tell
    # DeepSpeed to wait (the convention of DeepSpeed's own TiledMLP). Plain tensors ignore the attribute.
    for param in params:
        param.ds_grad_is_ready = ready


class SegmentedLMLoss(torch.autograd.Function):
    """sum over positions of CE(lm_head(hidden), targets) / divisor, one segment of positions at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, divisor: torch.Tensor,
                segment_tokens: int) -> torch.Tensor:
        # hidden [N, h], targets [N], divisor [] float32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], segment_tokens):
                logits = lm_head(hidden[start : start + segment_tokens]).float()  # [c, V]
                total += F.cross_entropy(logits, targets[start : start + segment_tokens], ignore_index=IGNORE_INDEX,
                                         reduction="sum")
        ctx.save_for_backward(hidden, targets, divisor)
        ctx.lm_head, ctx.segment_tokens = lm_head, segment_tokens
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, targets, divisor = ctx.saved_tensors
        lm_head, step = ctx.lm_head, ctx.segment_tokens
        params = [p for p in lm_head.parameters() if p.requires_grad]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # [N, h]
        starts = list(range(0, hidden.shape[0], step))
        scale = grad_loss.float() / divisor
        for i, start in enumerate(starts):
            if grad_hidden is None and not params:
                break
            _set_grad_ready(params, i == len(starts) - 1)
            segment = hidden[start : start + step].detach().requires_grad_(grad_hidden is not None)  # [c, h]
            with torch.enable_grad():
                logits = lm_head(segment).float()  # [c, V]
                loss = F.cross_entropy(logits, targets[start : start + step], ignore_index=IGNORE_INDEX,
                                       reduction="sum") * scale
            # One segment at a time: its [c, V] logits and their gradient are freed before the next one. The
            # LM head's parameter gradients accumulate through autograd (and ZeRO's hooks) as usual.
            loss.backward()
            if grad_hidden is not None:
                grad_hidden[start : start + step] = segment.grad
        return grad_hidden, None, None, None, None


# Triton's interpreter before 3.7 cannot run Liger's cross-entropy kernel (its loop bound arrives as an array, not
# a scalar: "only 0-dimensional arrays can be converted to Python scalars"); compiled kernels on CUDA are unaffected.
INTERPRETER_MIN_TRITON = (3, 7)


def _interpreter_runs_liger() -> bool:
    import triton

    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= INTERPRETER_MIN_TRITON


def liger_installed() -> bool:
    """liger-kernel's functional API imports (the package is there and its Triton loads)."""
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


def liger_usable(hidden: torch.Tensor) -> bool:
    """Liger's kernels can run here: liger-kernel imports, and the tensors are CUDA ones (or CPU ones under
    TRITON_INTERPRET=1, which is how the tests run them, with a Triton whose interpreter runs Liger's kernels)."""
    if not liger_installed():
        return False
    if not triton_usable(hidden):
        return False
    return hidden.is_cuda or _interpreter_runs_liger()


def _fused_head_forward(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, lm_head.weight, targets, bias=lm_head.bias,
                                            ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip


def fused_linear_cross_entropy_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over positions of CE(lm_head(hidden), targets), by Liger's fused kernel, run as the LM head's forward.

    The module call is what ZeRO-3 hooks: its pre-forward hook gathers the partitioned weight, its backward hooks
    gather it again and reduce the weight's gradient. The forward is bound on the instance for this one call only
    (restoring whatever the instance had), so the head stays an ordinary ``nn.Linear`` for everyone else."""
    had = "forward" in lm_head.__dict__
    previous = lm_head.__dict__.get("forward")
    lm_head.forward = types.MethodType(_fused_head_forward, lm_head)
    try:
        return lm_head(hidden, targets)
    finally:
        if had:
            lm_head.forward = previous
        else:
            del lm_head.forward


def segment_lm_loss(
    lm_head: nn.Module,
    hidden_states: torch.Tensor,  # [b, s, h] final (normed) decoder output
    labels: torch.Tensor,  # [b, s]
    segment_tokens: int = 4096,
    num_items_in_batch: int | torch.Tensor | None = None,
    impl: str = "auto",
    shift_labels: torch.Tensor | None = None,  # [b, s] targets already shifted (sequence-parallel shards)
) -> torch.Tensor:
    """Hugging Face's causal-LM loss without full logits (see the module docstring). ``shift_labels``, as in
    Hugging Face's loss, replaces the shifted ``labels``."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"segment loss implementation {impl!r}: allowed values are {', '.join(IMPLEMENTATIONS)}")
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, h]
    targets = (shift_labels if shift_labels is not None else _shift(labels)).reshape(-1).to(hidden.device)  # [N]
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum().to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    use_liger = impl == "liger" or (impl == "auto" and hidden.is_cuda and liger_usable(hidden))
    if use_liger:
        if not liger_usable(hidden):
            raise RuntimeError(
                "segment_loss_impl \"liger\" needs liger-kernel installed (pip install liger-kernel, or the extra "
                "lemo_ds[liger]) and CUDA tensors (CPU tensors only under TRITON_INTERPRET=1 with triton>=3.7); "
                "use \"auto\" or \"torch\""
            )
        return fused_linear_cross_entropy_sum(lm_head, hidden, targets).float() / divisor
    return SegmentedLMLoss.apply(hidden, lm_head, targets, divisor, segment_tokens)
