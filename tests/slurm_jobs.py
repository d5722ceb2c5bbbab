"""Submitting the README's Slurm job (launch/slurm/submit.sh) to a test cluster and reading what it leaves behind:
the helpers of tests/test_slurm.py (one node) and tests/test_slurm_multinode.py (nodes in network namespaces)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_util import REPO
from slurm_cluster import FINISHED, Cluster, SlurmError

SUBMIT = REPO / "launch" / "slurm" / "submit.sh"


def submit(cluster: Cluster, out: Path, *train_args: str, nodes: str = "1", tasks_per_node: int = 2, **env) -> int:
    """launch/slurm/submit.sh: ``nodes`` nodes (a count or a range: "1-2"), ``tasks_per_node`` CPU ranks on each,
    over gloo, the tiny preset at 256 tokens; ``env``: more variables of the job (DEEPSPEED_TIMEOUT=...)."""
    environment = {key: value for key, value in cluster.env.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(
        NODES=nodes,
        GPUS_PER_NODE="0",
        TASKS_PER_NODE=str(tasks_per_node),
        OUTPUT_DIR=str(out),
        PYTHON=sys.executable,
        TRITON_INTERPRET="0",  # conftest.py's interpreter for the kernel tests would slow the job many times over
        # --time: Slurm's own backstop for a job the test lost track of.
        SBATCH_FLAGS="--parsable --time=20",
        **env,
    )
    result = subprocess.run(
        [str(SUBMIT), "--seq-len", "256", *train_args], cwd=REPO, env=environment, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    return cluster.submitted(result)


def job_logs(cluster: Cluster, out: Path, job: int) -> str:
    """The batch log, the end of every rank log, the daemons' logs: what a failed assertion shows."""
    parts = []
    batch = out / "logs" / f"slurm-{job}.out"
    if batch.exists():
        parts.append(f"--- {batch.name}\n{batch.read_text(errors='replace')}")
    for path in sorted((out / "logs" / f"job{job}").glob("attempt*/rank*.log")):
        parts.append(f"--- {path.relative_to(out)}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join([*parts, cluster.daemon_logs()])


def finished(cluster: Cluster, out: Path, job: int, timeout: float) -> dict[str, str]:
    try:
        fields = cluster.wait_for(job, FINISHED, timeout)
    except SlurmError as error:
        pytest.fail(f"{error}\n{job_logs(cluster, out, job)}")
    return fields


def until(condition, timeout: float, what: str, cluster: Cluster, out: Path, job: int) -> None:
    """Poll ``condition`` while the job is pending or running."""
    deadline = time.monotonic() + timeout
    while not condition():
        state = cluster.state(job)
        if state in FINISHED or time.monotonic() > deadline:
            pytest.fail(f"job {job} ({state}): no {what} after {timeout:.0f} s\n{job_logs(cluster, out, job)}")
        time.sleep(0.3)


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def rank_log(out: Path, job: int, rank: int, attempt: int = 0) -> str:
    path = out / "logs" / f"job{job}" / f"attempt{attempt}" / f"rank{rank}.log"
    return path.read_text(errors="replace") if path.exists() else ""
