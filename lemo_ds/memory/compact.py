"""Exact compaction of what autograd stores inside a decoder layer (saved-tensor hooks).

Counted on CPU for one Llama-2-7B layer with peft LoRA r=8 on q/k/v/o (benchmarks/memory_accounting.py), autograd
stores about 48 x hidden bytes per token (s = tokens, h = hidden, I = intermediate; bf16 model, fp32 adapters):

- every LoRA adapter casts its bf16 input to float32 and its ``lora_A`` saves that copy: 4 x 4h (q, k and v each
  cast the same normed input; o casts the attention output);
- each RMSNorm saves a float32 copy of its bf16 input (``hidden_states.to(torch.float32)``): 2 x 4h;
- the SwiGLU MLP saves gate (SiLU's input), SiLU's output and up (the product's operands): 3 x 2I;
- attention (SDPA) saves q, k, v, output: 8h (Llama-2) or 5h (Llama-3, 8 KV heads).

A third of it (the float32 copies, SiLU's output) is a function of another tensor that is stored anyway, or of a
tensor half its size. Inside the layer's forward this module records such derivations (a TorchFunctionMode sees
widening casts and ``F.silu``; the norms record their output, see ``RecordedNormMixin``) and a saved-tensor pack
hook stores the source instead of the derived tensor; the unpack hook recomputes the derived tensor in backward,
with the same op on the same input, so the values autograd gets are bit-identical (no matmul is recomputed: a
cast, a SiLU, an RMSNorm). What stays per token: the norm inputs (2 x 2h), attention's q, k, v and output, gate
and up (2 x 2I): about 12h + 4I instead of 32h + 6I (Llama-2: 23h instead of 48h).

The hooks chain onto whatever saved-tensor hooks are active when the layer runs (PyTorch's non-reentrant
checkpoint, the offload of ``lemo_ds.memory.offload``): the source goes through the outer pack hook, in the first
forward and in the recompute alike, so those mechanisms see a consistent sequence of tensors.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

# A cast to a wider float type is exact (every bf16/fp16 value is a float32 value): recomputing it is bit-exact.
_WIDER = {torch.bfloat16: (torch.float32, torch.float64), torch.float16: (torch.float32, torch.float64),
          torch.float32: (torch.float64,)}
_CASTS = (torch.Tensor.to, torch.Tensor.float, torch.Tensor.double)

_local = threading.local()


class _Packed:
    """What the pack hook stores: a plain (outer-packed) tensor, or how to recompute a derived one."""

    __slots__ = ("kind", "arg", "inner", "view", "cache")

    def __init__(self, kind: str | None, arg: Any, inner: Any, view: tuple | None = None) -> None:
        self.kind, self.arg, self.inner = kind, arg, inner  # kind None: inner is the outer hook's packed tensor
        self.view = view  # (size, stride, offset) when what was saved is a view of the derived tensor
        self.cache: weakref.ref | None = None  # the recomputed tensor while someone still holds it


class Derivations:
    """Derived tensors of one layer forward: tensor -> (kind, source, arg). Weak keys: nothing is kept alive."""

    def __init__(self) -> None:
        self.derived: dict[int, tuple] = {}  # storage address -> (weakref to the derived tensor, kind, source, arg)
        self.memo = WeakIdKeyDictionary()  # tensor -> its _Packed (q, k and v share their normed input's record)

    def record(self, out: torch.Tensor, kind: str, source: torch.Tensor, arg: Any = None) -> None:
        if out is not source and out.shape == source.shape and out.device == source.device and out.numel():
            self.derived[out.untyped_storage().data_ptr()] = (weakref.ref(out), kind, source, arg)

    def lookup(self, tensor: torch.Tensor) -> tuple | None:
        """(kind, source, arg, view) when ``tensor`` is a recorded derived tensor or a view of one (F.linear saves
        a 2-D view of a 3-D input, made in C++ where no mode sees it)."""
        if tensor.numel() == 0:
            return None
        address = tensor.untyped_storage().data_ptr()
        entry = self.derived.get(address)
        if entry is None:
            return None
        ref, kind, source, arg = entry
        out = ref()
        if out is None or out.untyped_storage().data_ptr() != address or out.dtype != tensor.dtype:
            del self.derived[address]  # the derived tensor died; its memory may belong to another tensor now
            return None
        same = tensor.shape == out.shape and tensor.stride() == out.stride()
        same = same and tensor.storage_offset() == out.storage_offset()
        view = None if same else (tuple(tensor.shape), tuple(tensor.stride()),
                                  tensor.storage_offset() - out.storage_offset())
        if view is not None and (out.storage_offset() != 0 or not out.is_contiguous()):
            return None  # a view of a strided derived tensor: store it as it is
        return kind, source, arg, view


def active() -> Derivations | None:
    """The derivation registry of the layer forward running on this thread, if compaction is on."""
    return getattr(_local, "registry", None)


class _DerivationMode(TorchFunctionMode):
    def __init__(self, registry: Derivations) -> None:
        super().__init__()
        self.registry = registry

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            return out
        # Only the innermost compaction records, and only what autograd may save. A record holds its source
        # tensor until its compaction exits: the causal LM's compaction (around every layer) recording the layers'
        # SiLUs and casts, and records made under no_grad (the tiles of a tiled MLP, a checkpoint's first pass),
        # kept every layer's MLP gates alive through the forward (H200, Llama-3-8B at 64K with checkpointing: 21.7
        # GiB of gate tiles at the peak, 56.0 GiB instead of 39.6 without compaction).
        if active() is not self.registry or not torch.is_grad_enabled():
            return out
        source = args[0]
        if func in _CASTS and out.dtype in _WIDER.get(source.dtype, ()) and out.layout == source.layout:
            self.registry.record(out, "cast", source, out.dtype)
        elif func is F.silu and not kwargs.get("inplace", False) and not (len(args) > 1 and args[1]):
            self.registry.record(out, "silu", source)
        return out


def _recompute(kind: str, arg: Any, source: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if kind == "cast":
            return source.to(arg)
        if kind == "silu":
            return F.silu(source)
        return super(RecordedNormMixin, arg).forward(source)  # "module": an RMSNorm, from its input


def _pack(tensor: torch.Tensor, registry: Derivations, outer_pack, share: bool) -> _Packed:
    # Module-level and recursive by name, not a closure that calls itself: a self-referencing closure is a
    # reference cycle, and whatever it holds (the registry's source tensors) would then live until Python's cyclic
    # collector runs (on the H200 the benchmark's peaks grew 9-15 GiB a round that way).
    packed = registry.memo.get(tensor) if share else None
    if packed is not None:
        return packed
    entry = registry.lookup(tensor)
    if entry is None:
        return _Packed(None, None, tensor if outer_pack is None else outer_pack(tensor))
    kind, source, arg, view = entry
    packed = _Packed(kind, arg, _pack(source, registry, outer_pack, share), view)
    if share:
        registry.memo[tensor] = packed
    return packed


def _unpack(packed: _Packed, outer_unpack, share: bool) -> torch.Tensor:
    if packed.kind is None:
        return packed.inner if outer_unpack is None else outer_unpack(packed.inner)
    value = packed.cache() if packed.cache is not None and share else None
    if value is None:
        value = _recompute(packed.kind, packed.arg, _unpack(packed.inner, outer_unpack, share))
        if packed.view is not None:
            value = value.contiguous().as_strided(*packed.view)
        packed.cache = weakref.ref(value)
    return value


@contextlib.contextmanager
def compaction() -> Iterator[Derivations]:
    """Record derivations and store sources instead of derived tensors while the block runs."""
    registry = Derivations()
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    # Under an outer hook (PyTorch's non-reentrant checkpoint) every pack must reach it once and be unpacked once;
    # an outer compaction (the causal LM's, around the layers') has no such rule.
    share = outer_pack is None or getattr(outer_pack, "lemo_compaction", False)
    pack = functools.partial(_pack, registry=registry, outer_pack=outer_pack, share=share)
    pack.lemo_compaction = True
    unpack = functools.partial(_unpack, outer_unpack=outer_unpack, share=share)

    previous = active()
    _local.registry = registry
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), _DerivationMode(registry):
            yield registry
    finally:
        _local.registry = previous
        # After the block nothing packs any more (a checkpoint's recompute enters a compaction of its own): drop the
        # registry's references to the source tensors now rather than with the registry.
        registry.derived.clear()
        registry.memo.clear()


class RecordedNormMixin:
    """Placed before an RMSNorm class: under ``compaction`` its output is recorded as recomputable from its input
    (the LoRA adapters of q/k/v then store the norm's input, which the norm stores anyway). Not under ZeRO-3
    partitioning: recomputing in backward would need the gathered weight."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden_states)
        registry = active()
        weight = getattr(self, "weight", None)
        if registry is not None and torch.is_grad_enabled() and getattr(weight, "ds_id", None) is None:
            registry.record(out, "module", hidden_states, self)
        return out


def is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")
