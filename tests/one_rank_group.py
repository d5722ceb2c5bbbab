"""A one-rank gloo process group in the calling process, for tests that build real DeepSpeed engines or use
DeepSpeed's checkpointing without a launcher."""

from __future__ import annotations

import os

import torch


def start_one_rank_group(port_base: int) -> None:
    """Start DeepSpeed's distributed backend as rank 0 of 1 (gloo) unless a group exists. The port is
    ``port_base`` plus the process id modulo 90, so that pytest-xdist workers on one machine do not collide."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port_base + os.getpid() % 90), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
