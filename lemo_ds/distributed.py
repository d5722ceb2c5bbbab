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


def describe_ranks(ranks) -> str:
    """'rank 2', 'ranks 2, 3', 'ranks 0, 8-15': ranks named in a message (runs of three or more as a range)."""
    ranks = sorted(ranks)
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    parts = [f"{run[0]}-{run[-1]}" if len(run) >= 3 else ", ".join(map(str, run)) for run in runs]
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(parts)}"
