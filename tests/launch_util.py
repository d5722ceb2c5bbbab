"""Starting real multi-rank DeepSpeed jobs from the tests (CPU ranks over gloo)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_command(script: str | Path, *args: str, ranks: int = 2) -> list[str]:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *args]


def run_deepspeed(script: str | Path, *args: str, ranks: int = 2, timeout: float = 300, env: dict | None = None):
    """Run a script on ``ranks`` CPU ranks; returns the CompletedProcess (stdout and stderr as text)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if "CUDA_VISIBLE_DEVICES" not in environment and not _has_cuda():
        environment.setdefault("DS_ACCELERATOR", "cpu")
    return subprocess.run(
        deepspeed_command(script, *args, ranks=ranks),
        cwd=REPO,
        env=environment,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
