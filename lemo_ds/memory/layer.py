"""A decoder layer's share of the memory stack: compaction of its saved tensors, offload of its checkpoint input."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lemo_ds.memory.compact import compaction
from lemo_ds.memory.offload import CheckpointOffloader


@dataclass(eq=False)
class LayerMemory:
    compact: bool  # compaction of the tensors the layer's call saves for backward (memory/compact.py)
    offloader: CheckpointOffloader | None  # the checkpoint's stored input goes to host memory (memory/offload.py)

    def context(self) -> contextlib.AbstractContextManager:
        """Around the model's own layer call (on every row, or on the kept rows of a sparse layer)."""
        return compaction() if self.compact else contextlib.nullcontext()

    def checkpoint_function(self, raw: Callable[..., Any], dense: bool) -> Callable[..., Any]:
        """The layer's activation checkpoint function (Hugging Face's ``_gradient_checkpointing_func``), offloading
        its stored input where asked. ``dense``: the call is a whole dense layer, whose output the offloader may
        rebuild by running it again (``memory.layers_per_stored_input``)."""
        return raw if self.offloader is None else self.offloader.wrap(raw, rebuildable=dense)
