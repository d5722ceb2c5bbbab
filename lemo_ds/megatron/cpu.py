"""Running Megatron-core 0.16's local (non Transformer-Engine) GPT spec on a CPU, for tests and small examples.

Megatron-core assumes CUDA in a few places that a CPU forward and backward of a GPT model reach, although the
math is plain PyTorch:

- RoPE (``RotaryEmbedding.get_emb``) moves its inverse frequencies to ``torch.cuda.current_device()``, and
  ``DotProductAttention`` takes its score buffer from a global buffer allocated there;
- the default causal mask (``get_default_causal_mask``, used when no attention mask is passed) is made with
  ``device="cuda"``;
- attention dropout forks the CUDA RNG tracker, and activation checkpointing saves and restores the CUDA RNG.

``megatron_on_cpu()`` patches exactly those for the duration of a ``with`` block: ``torch.cuda.current_device``
answers the CPU device, the causal mask is built on the CPU, the RNG tracker is one whose ``fork`` is a no-op
(dropout then draws from the CPU generator) and the CUDA RNG save/restore of checkpointing does nothing. It changes
nothing when CUDA is available. Nothing else in Megatron is touched; a path that needs CUDA still fails loudly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.ones(sq, sq, dtype=torch.bool).triu(1)  # [sq, sq], True above the diagonal = masked out


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Let Megatron-core's local spec run on the CPU inside this block (a no-op when CUDA is available)."""
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mpu_random

    saved = [
        (torch.cuda, "current_device", torch.cuda.current_device),
        (fused_softmax, "get_default_causal_mask", fused_softmax.get_default_causal_mask),
        (mpu_random, "_get_cuda_rng_state", mpu_random._get_cuda_rng_state),
        (mpu_random, "_set_cuda_rng_state", mpu_random._set_cuda_rng_state),
    ]
    torch.cuda.current_device = lambda: torch.device("cpu")
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    mpu_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mpu_random._set_cuda_rng_state = lambda *args, **kwargs: None
    mpu_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        mpu_random.initialize_rng_tracker(force_reset=True)
