"""Every decoder layer's share of the memory stack: compaction of its saved tensors, offload of its checkpoint input.

``apply_lemo`` puts ``MemoryLayerMixin`` in front of every decoder layer's class (dense and sparse: a sparse layer
is ``(SparseDecoderLayerMixin, MemoryLayerMixin, <HF layer>)``, so its kept-rows forward and its kept-rows
checkpoint go through it too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from lemo_ds.memory.compact import compaction
from lemo_ds.memory.offload import CheckpointOffloader

_RAW = "_gradient_checkpointing_func"


@dataclass
class MemoryLayerState:
    compact: bool
    offloader: CheckpointOffloader | None


class MemoryLayerMixin:
    _lemo_memory_layer: MemoryLayerState

    # Hugging Face sets ``_gradient_checkpointing_func`` on each layer (gradient_checkpointing_enable) before or after
    # apply_lemo; the property keeps what it set in the instance dict and hands out the offloading wrapper.
    @property
    def _gradient_checkpointing_func(self) -> Any:
        try:
            raw = self.__dict__[_RAW]
        except KeyError:
            raise AttributeError(_RAW) from None
        offloader = self._lemo_memory_layer.offloader
        return raw if offloader is None else offloader.wrap(raw)

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, value: Any) -> None:
        self.__dict__[_RAW] = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with compaction() if self._lemo_memory_layer.compact else contextlib.nullcontext():
            return super().forward(*args, **kwargs)
