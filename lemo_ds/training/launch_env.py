"""Process environment of a training rank: a world of one without a launcher, CPU threads per rank."""

from __future__ import annotations

import os
import socket

import torch

_LAUNCHED_BY = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # deepspeed/torchrun, Open MPI, MPICH/Intel MPI


def default_single_process_env() -> None:
    """``python launch/train.py`` without a launcher: set the variables the deepspeed launcher would set for
    a world of one (otherwise deepspeed.init_distributed goes looking for MPI)."""
    if any(key in os.environ for key in _LAUNCHED_BY):
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def release_cpu_comm_buffer() -> None:
    """Unlink this rank's shared-memory all-reduce buffer of DeepSpeed's CPU backend, if it made one.

    DeepSpeed 0.19.8 (ops/csrc/cpu/comm/shm.cpp) creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (66 MB) for every CPU rank and never unlinks it, so every CPU job leaks 66 MB per rank of RAM-backed /dev/shm:
    325 such files (21 GB) filled a 24 GB machine here. Call after the process group is destroyed."""
    addr, port, rank = (os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if None in (addr, port, rank):
        return
    buffer = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    try:
        os.unlink(buffer)
    except FileNotFoundError:
        pass


def set_cpu_threads(device_type: str) -> None:
    """CPU ranks of one machine share its cores: give each its share, unless OMP_NUM_THREADS says otherwise
    (torch would otherwise start one thread per core in every rank and oversubscribe the machine)."""
    if device_type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(local_ranks, 1)))
