"""Process environment of a training rank: a world of one without a launcher, CPU threads per rank."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

import torch

_LAUNCHED_BY = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # deepspeed/torchrun, Open MPI, MPICH/Intel MPI


def default_single_process_env() -> None:
    """``python launch/train.py`` without a launcher: set the variables the deepspeed launcher would set for
    a world of one (otherwise deepspeed.init_distributed goes looking for MPI)."""
    if any(key in os.environ for key in _LAUNCHED_BY):
        return
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )


def free_port() -> int:
    """A TCP port of this machine that nothing listens on now (the kernel's pick), for a rendezvous: the deepspeed
    launcher's default, 29500, is taken by any other job on the machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_name() -> str:
    """The name of this rank's node, for messages: Slurm's name for it (SLURMD_NODENAME), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def exit_on_sigterm(status: int) -> None:
    """This rank is on its way out with ``status``, its one error line printed. Under srun --kill-on-bad-exit the first
    rank to exit has srun send SIGTERM to the others, which may still be tearing down (the process group) after
    printing the same line: they then exit with the same status at once rather than as killed by SIGTERM, so the
    job's exit code is the error's (2, 3), not 143. (The job then leaves through ``exit_now``: the interpreter's own
    teardown gives signal handlers back before it ends.)"""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread (a test calling the job in a thread)
    signal.signal(signal.SIGTERM, lambda signum, frame: exit_now(status))


def exit_now(status: int) -> None:
    """End the process with ``status`` without the interpreter's teardown (whatever matters is written and closed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


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


def pending_op_build() -> Path | None:
    """The folder where deepspeed.init_distributed is about to compile DeepSpeed's shared-memory all-reduce op, or
    None when it will not (another accelerator, a prebuilt op, or one compiled by an earlier start).

    DeepSpeed's CPU backend compiles that C++ op just in time, on the first start with a given DeepSpeed and torch
    (about a minute, before step 1, with nothing printed); later starts load it from torch's extensions folder
    (TORCH_EXTENSIONS_DIR). Saying so beforehand tells a user why the first start is slow."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils import cpp_extension

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    if installed_ops.get(builder.NAME, False):
        return None
    try:
        folder = Path(cpp_extension._get_build_directory(builder.name, verbose=False))  # where torch builds it
    except (AttributeError, OSError):
        return None  # another torch layout: say nothing rather than guess
    return None if (folder / f"{builder.name}.so").exists() else folder
