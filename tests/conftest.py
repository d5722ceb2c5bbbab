"""Shared test setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 must be set
before triton is first imported, which is why it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# What torch.distributed and DeepSpeed read from (and deepspeed.init_distributed writes to) the environment.
_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "CROSS_RANK", "CROSS_SIZE")  # fmt: skip


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """A test that starts a process group in the pytest process (deepspeed.initialize or init_distributed on one
    rank) must not leave it, nor the environment variables DeepSpeed sets, to the tests after it: a Hugging Face
    Trainer that finds them wraps its model in DDP. Which tests follow which depends on the order (pytest-xdist
    shares files out between workers), so each test leaves the state as it found it."""
    started = torch.distributed.is_available() and torch.distributed.is_initialized()
    env = {name: os.environ.get(name) for name in _DISTRIBUTED_ENV}
    yield
    if not started and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_sessionstart(session):
    session.config._lemo_started = __import__("time").time()


def pytest_sessionfinish(session, exitstatus):
    """Remove the /dev/shm all-reduce buffers that this session's CPU DeepSpeed jobs left (DeepSpeed never unlinks
    them: 66 MB per rank per job; see lemo_ds.training.launch_env.release_cpu_comm_buffer)."""
    from pathlib import Path

    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller cleans up once all are done
        return
    started = getattr(session.config, "_lemo_started", None)
    if started is None:
        return
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if path.stat().st_mtime >= started - 1:
                path.unlink()
        except FileNotFoundError:
            pass
