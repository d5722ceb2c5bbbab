"""Shared test setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 must be set
before triton is first imported, which is why it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
