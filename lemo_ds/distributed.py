"""This process's rank and the world's size, with or without a process group: the one helper every part reads them
through (a single process without ``torch.distributed`` set up is rank 0 of 1)."""

from __future__ import annotations

import torch


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1
