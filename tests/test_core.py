"""The sparse core's recompute cache (lemo_ds.core.recompute): what a checkpoint's recompute takes back."""

from __future__ import annotations

import torch

from lemo_ds.core.recompute import SelectionCache


def blocks(value: int) -> torch.Tensor:
    return torch.full((2, 3), value)  # [b, k]


def test_by_key_takes_that_forward_whatever_the_order():
    cache, first, second = SelectionCache(), object(), object()
    cache.put(0, blocks(1), first)
    cache.put(0, blocks(2), second)
    assert torch.equal(cache.take(0, second), blocks(2))  # a backward of both losses recomputes the later first
    assert torch.equal(cache.take(0, first), blocks(1))
    assert cache.take(0, first) is None and len(cache) == 0


def test_without_key_takes_the_oldest_of_this_step_and_drops_earlier_steps():
    cache = SelectionCache()
    cache.put(0, blocks(0))  # a forward of step 0 whose backward never came
    cache.put(1, blocks(1))
    cache.put(1, blocks(2))
    assert torch.equal(cache.take(1), blocks(1))  # Megatron: backward passes in the order of their forwards
    assert torch.equal(cache.take(1), blocks(2))
    assert len(cache) == 0


def test_at_most_limit_entries_are_held():
    cache = SelectionCache(limit=2)
    for value in range(5):
        cache.put(0, blocks(value))
    assert len(cache) == 2 and torch.equal(cache.take(0), blocks(3))
