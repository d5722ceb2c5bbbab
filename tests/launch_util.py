"""Starting real multi-rank DeepSpeed jobs from the tests (CPU ranks over gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lemo_ds.training.launch_env import free_port

REPO = Path(__file__).resolve().parent.parent

# Where a script under tests/dist writes its per-rank report (tests/dist/_engine.py: write_report). A file per rank,
# not stdout: the launcher merges the ranks' stdout, and two ranks printing at once once joined their JSON lines
# into one (CI, test_zero3 "Extra data" at char 174).
REPORT_DIR_ENV = "LEMO_TEST_REPORT_DIR"


TRAIN = REPO / "launch" / "train.py"
# conftest turns the Triton interpreter on for the kernel tests; jobs run PyTorch's path, as "kernels": "auto" does
# on CPU.
JOB_ENV = {"TRITON_INTERPRET": "0"}


def train_single(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python launch/train.py ARGS``: one process, no launcher (a world of one)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update({"PYTHONUNBUFFERED": "1", **JOB_ENV, **(env or {})})
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], cwd=REPO, env=environment, text=True, capture_output=True, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result``, after asserting that the job exited 0 (its output's tails in the message otherwise)."""
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def deepspeed_command(script: str | Path, *args: str, ranks: int = 2, port: int | None = None) -> list[str]:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    port = free_port() if port is None else port
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(port), str(script), *args]


def remove_cpu_comm_buffers(port: int | str) -> None:
    """DeepSpeed's CPU backend leaves a 66 MB /dev/shm buffer per rank of every job (see
    lemo_ds.training.launch_env.release_cpu_comm_buffer); a killed or crashed job cannot release its own."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        path.unlink(missing_ok=True)


def run_deepspeed(script: str | Path, *args: str, ranks: int = 2, timeout: float = 300, env: dict | None = None):
    """Run a script on ``ranks`` CPU ranks; returns the CompletedProcess (stdout and stderr as text)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if "CUDA_VISIBLE_DEVICES" not in environment and not _has_cuda():
        environment.setdefault("DS_ACCELERATOR", "cpu")
    port = free_port()
    try:
        return subprocess.run(
            deepspeed_command(script, *args, ranks=ranks, port=port),
            cwd=REPO,
            env=environment,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
    finally:
        remove_cpu_comm_buffers(port)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_for_reports(script: str | Path, *args: str, ranks: int = 2, timeout: float = 300, env: dict | None = None):
    """Run a tests/dist script on ``ranks`` CPU ranks; asserts it exited 0 and that every rank wrote its report.
    Returns the reports (dicts) in rank order."""
    with tempfile.TemporaryDirectory(prefix="lemo-reports-") as folder:
        result = run_deepspeed(script, *args, ranks=ranks, timeout=timeout, env={**(env or {}), REPORT_DIR_ENV: folder})
        tail = result.stdout[-3000:] + result.stderr[-3000:]
        assert result.returncode == 0, tail
        reports = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("rank*.json"))]
    assert sorted(report["rank"] for report in reports) == list(range(ranks)), tail
    return sorted(reports, key=lambda report: report["rank"])


def load_launch_script(name: str):
    """launch/<name>.py imported as a module, to call its functions in this process (launch/ is not a package).
    Registered in sys.modules like any import: its dataclasses look their module up there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"lemo_ds_launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
