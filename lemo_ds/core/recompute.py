"""Selections kept for the recompute of an activation checkpoint, so that it runs on exactly the forward's tokens.

A checkpointed layer runs its forward twice: once in the forward pass, and again inside the backward pass. The
second run must keep the same blocks as the first, whatever the scorer (the random scorer draws by forward counter,
a predictor may have been refreshed in between). Each checkpointed forward puts its selection here; the recompute
takes it back:

- by key, where the layer owns the checkpoint call and can hand the recompute a key through the checkpointed
  function (the Hugging Face layer does): exact, whatever order the recomputes come in;
- in order, oldest first, where a caller outside the layer owns the checkpoint (Megatron's ``CheckpointFunction``
  in ``TransformerBlock``): Megatron's schedules run the backward passes of micro-batches in the order of their
  forwards.

Entries of an earlier optimizer step are dropped (their forward never got a backward), and at most ``limit`` are
held, so a forward whose backward never comes cannot leak.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class _Entry:
    step: int
    key: object | None
    blocks: torch.Tensor  # [b, k]


@dataclass(eq=False)
class SelectionCache:
    limit: int = 16
    _entries: collections.deque = field(default_factory=collections.deque)

    def put(self, step: int, blocks: torch.Tensor, key: object | None = None) -> None:
        self._entries.append(_Entry(step, key, blocks))
        while len(self._entries) > self.limit:
            self._entries.popleft()

    def take(self, step: int, key: object | None = None) -> torch.Tensor | None:
        """The blocks put with ``key`` (or the oldest of this step when ``key`` is None), removed; None if absent."""
        self._entries = collections.deque(entry for entry in self._entries if entry.step >= step)
        for entry in self._entries:
            if key is None or entry.key is key:
                self._entries.remove(entry)
                return entry.blocks
        return None

    def __len__(self) -> int:
        return len(self._entries)
