"""The fused decoder-layer ops: RMSNorm, RoPE and the SwiGLU product as lemo_ds's Triton kernels, in every layer.

``apply_lemo`` converts, with the policy's help, every RMSNorm of the decoder (the final norm included), every
attention module and every SwiGLU MLP by swapping its class (``lemo_ds.class_swap``), dense and sparse layers alike;
the sparse layers run the same modules on their kept rows. Each converted forward decides per call, from the
``fused_ops`` setting and where its tensors live, whether the kernel runs or the model's own forward does:

- ``"auto"``: the kernels on CUDA tensors, the model's own PyTorch ops on every other device (a CPU run is exactly
  what it was without the fused ops);
- ``"on"``: the kernels everywhere; on a CPU only under ``TRITON_INTERPRET=1`` (the tests), else an error.

The kernels (``lemo_ds/kernels/rms_norm.py``, ``rope.py``, ``swiglu.py``) compute what the model's modules compute,
in float32 with the same roundings to the model dtype; what they change is speed and what autograd stores (no
float32 copies in the norms, no SiLU output in the MLP). A module whose ``forward`` was replaced on the instance
(Liger-Kernel's ``apply_liger_kernel_to_*(model=...)`` does that) keeps that forward: it is not converted.

RoPE lives in a module-level function of the model's modeling file that the attention's forward looks up when it
runs (``apply_rotary_pos_emb``). The converted attention binds that name to the fused function for the duration of
its own forward, and only there: any other model of the same family in the process (an unconverted reference, say)
keeps Hugging Face's function. Training is single-threaded per process, so no other forward runs meanwhile.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from lemo_ds.class_swap import root_class, swap_in
from lemo_ds.kernels.dispatch import resolve_backend, triton_usable
from lemo_ds.kernels.rms_norm import rms_norm
from lemo_ds.kernels.rope import apply_rope
from lemo_ds.kernels.swiglu import silu_mul

if TYPE_CHECKING:
    from lemo_ds.policies.base import DecoderLayerPolicy

FusedOps = Literal["auto", "on", "off"]
_MODE = "_lemo_fused"  # the converted module's setting ("auto" or "on"), in its instance dict


def fused_kernels_run(mode: str, *tensors: torch.Tensor) -> bool:
    """Whether a converted module runs its kernel on ``tensors`` under ``mode`` (see the module docstring)."""
    if mode == "auto":
        return all(t.is_cuda for t in tensors) and triton_usable(*tensors)
    return resolve_backend("triton", *tensors) == "triton"  # "on": Triton, or the error that says why not


class FusedRMSNormMixin:
    """Placed before a Llama-style RMSNorm class (``weight``, ``variance_epsilon``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if fused_kernels_run(self.__dict__[_MODE], hidden_states):
            return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend="triton")
        return super().forward(hidden_states)


class FusedSwiGLUMixin:
    """Placed before a Llama-style MLP class: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_kernels_run(self.__dict__[_MODE], x):
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x), backend="triton"))
        return super().forward(x)


class FusedRoPEAttentionMixin:
    """Placed before an attention class whose forward calls its modeling file's ``apply_rotary_pos_emb`` (the
    policy's ``rope_function``)."""

    _lemo_rope_function: str = "apply_rotary_pos_emb"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = sys.modules[root_class(self).__module__]
        name = self._lemo_rope_function
        model_rope = getattr(module, name)
        setattr(module, name, _fused_rope_for(model_rope, self.__dict__[_MODE]))
        try:
            return super().forward(*args, **kwargs)
        finally:
            setattr(module, name, model_rope)


def _fused_rope_for(model_rope: Callable, mode: str) -> Callable:
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
        # Hugging Face's layout is [b, heads, s, d] with cos/sin [b or 1, s, d] (unsqueeze_dim 1); another layout
        # is the model's own function's business.
        if unsqueeze_dim != 1 or not fused_kernels_run(mode, q, k, cos, sin):
            return model_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return apply_rope(q, k, cos, sin, backend="triton")

    return rope


_MIXINS = (FusedRMSNormMixin, FusedSwiGLUMixin, FusedRoPEAttentionMixin)


def apply_fused_ops(model: nn.Module, policy: DecoderLayerPolicy, mode: FusedOps) -> int:
    """Convert the modules of ``model`` (the bare Hugging Face causal LM) that the policy names; returns how many.
    ``mode`` "off" converts nothing."""
    if mode == "off":
        return 0
    converted = 0
    for module, mixin in policy.fusable_modules(model):
        if "forward" in module.__dict__ or isinstance(module, _MIXINS):
            continue  # replaced on the instance by someone else (Liger-Kernel), or converted already
        swap_in(module, mixin).__dict__[_MODE] = mode
        if mixin is FusedRoPEAttentionMixin:
            module.__dict__["_lemo_rope_function"] = policy.rope_function
        converted += 1
    return converted


def fused_mixins() -> tuple[type, ...]:
    """The mixins this module swaps in (``remove_lemo`` swaps them out)."""
    return _MIXINS


def forget_fused_state(module: nn.Module) -> None:
    """Drop what ``apply_fused_ops`` stored on a module (after its class was swapped back)."""
    module.__dict__.pop(_MODE, None)
    module.__dict__.pop("_lemo_rope_function", None)
