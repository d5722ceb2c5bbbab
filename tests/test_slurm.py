"""Multi-node launch on Slurm (launch/slurm/) and resuming across jobs (lemo_ds/training/resume.py).

Checkpoint atomicity and latest-complete discovery are tested directly: folders as a cut-short save leaves
them, and a real DeepSpeed save killed with SIGKILL halfway. The ``slurm`` tests start a real one-node Slurm
cluster (tests/slurm_cluster.py; needs root and Debian's slurm-wlm and munge) and submit
launch/slurm/submit.sh with two CPU ranks over gloo: a job, a second submission that resumes it and is
requeued through the template's pre-emption handler, and a job whose rank dies. Without the Slurm binaries
these tests are skipped, unless LEMO_REQUIRE_SLURM=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_util import REPO, free_port
from slurm_cluster import Cluster, missing_binaries
from slurm_jobs import finished, job_logs, steps, submit, summary, until

from lemo_ds.training import resume
from lemo_ds.training.errors import TrainingSetupError

# The first DeepSpeed job on a fresh machine compiles a CPU comm op (~60 s) before it trains.
FIRST_JOB_TIMEOUT = 480
JOB_TIMEOUT = 300


# ---- discovery of the latest complete checkpoint, on folders as a cut-short save leaves them -------------------


def _tag(ckpt: Path, step: int, complete: bool = True) -> None:
    tag_dir = ckpt / f"step{step}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        (tag_dir / resume.COMPLETE).write_text(json.dumps({"tag": tag_dir.name, "step": step}))


def test_latest_naming_a_complete_tag_wins(tmp_path):
    _tag(tmp_path, 2)
    _tag(tmp_path, 4)
    _tag(tmp_path, 6, complete=False)
    (tmp_path / resume.LATEST).write_text("step2")  # a fresh run restarted in the folder of an older one
    found = resume.find_checkpoint(tmp_path)
    assert (found.tag, found.step, found.incomplete, found.notes) == ("step2", 2, ("step6",), ())


def test_incomplete_latest_falls_back_to_the_newest_complete_tag(tmp_path):
    _tag(tmp_path, 2)
    _tag(tmp_path, 10)
    _tag(tmp_path, 12, complete=False)
    (tmp_path / resume.LATEST).write_text("step12")
    found = resume.find_checkpoint(tmp_path)
    assert (found.tag, found.step, found.incomplete) == ("step10", 10, ("step12",))  # by step, not by name
    assert "'latest' names 'step12', which is not a complete checkpoint" in found.notes[0]
    resume.require_checkpoint(tmp_path)


def test_no_latest_and_a_torn_marker(tmp_path):
    _tag(tmp_path, 1)
    _tag(tmp_path, 2, complete=False)
    (tmp_path / "step2" / resume.COMPLETE).write_text('{"tag": "st')  # not written by atomic_io.write_text_atomic
    assert resume.find_checkpoint(tmp_path).tag == "step1"


def test_only_incomplete_checkpoints(tmp_path):
    _tag(tmp_path, 3, complete=False)
    assert resume.find_checkpoint(tmp_path) == resume.Found(None, None, ("step3",))
    with pytest.raises(TrainingSetupError, match="no complete checkpoint in .*without lemo_ds_complete.json: step3"):
        resume.require_checkpoint(tmp_path)
    with pytest.raises(TrainingSetupError, match="--resume: no checkpoint in"):
        resume.require_checkpoint(tmp_path / "nothing")


class _RecordingEngine(torch.nn.Module):
    """save_checkpoint as DeepSpeed's writes a tag (one rank), recording what the marker looked like then. A module,
    as DeepSpeed's engine is (resume.save looks through its modules for a predictor scorer)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.module = torch.nn.Linear(2, 2)  # the weights resume.save checks for NaN/inf before saving
        self.device = torch.device("cpu")

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        tag_dir = Path(save_dir) / tag
        self.calls.append({"save_latest": save_latest, "marker_before": (tag_dir / resume.COMPLETE).exists()})
        tag_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        return True


def test_save_marks_the_tag_complete_after_writing_it_and_overwrites_safely(tmp_path):
    args = argparse.Namespace(seq_len=256, seed=0, data=None, model="tiny-llama", lora_r=8)
    _tag(tmp_path, 4)  # a complete step4 of an older run in the same folder, about to be overwritten
    (tmp_path / resume.LATEST).write_text("step4")
    engine = _RecordingEngine()
    resume.save(engine, tmp_path, 2, 4, args)
    resume.save(engine, tmp_path, 4, 8, args)
    # DeepSpeed never writes 'latest' itself, and the old step4 stopped counting before its files changed.
    assert engine.calls == [{"save_latest": False, "marker_before": False}] * 2
    marker = json.loads((tmp_path / "step4" / resume.COMPLETE).read_text())
    assert (marker["tag"], marker["step"], marker["rows_consumed"], marker["world_size"]) == ("step4", 4, 8, 1)
    assert (tmp_path / resume.LATEST).read_text() == "step4"
    found = resume.find_checkpoint(tmp_path)
    assert (found.tag, found.step, found.candidates, found.incomplete) == ("step4", 4, ("step4", "step2"), ())
    assert not list(tmp_path.rglob(".*tmp*"))


# ---- a real save killed halfway --------------------------------------------------------------------------------

_SAVE_THEN_STALL = """
import argparse, os, sys, time
from pathlib import Path
import torch, deepspeed
from lemo_ds.training import resume

ckpt = Path(sys.argv[1])
model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
args = argparse.Namespace(seq_len=256, seed=0, data=None, model="mlp", lora_r=0)
resume.save(engine, ckpt, 1, 10, args)

real_save = torch.save
def save_one_file_then_stall(obj, path, *rest, **kwargs):
    real_save(obj, path, *rest, **kwargs)
    (ckpt / "midway").write_text(str(path))  # the test kills this process now
    time.sleep(600)
torch.save = save_one_file_then_stall  # DeepSpeed's checkpoint engine writes each file with torch.save
resume.save(engine, ckpt, 2, 20, args)
"""


@pytest.mark.slow
def test_save_killed_midway_leaves_the_previous_checkpoint_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO)}  # fmt: skip
    log = tmp_path / "child.log"
    with open(log, "wb") as output:
        child = subprocess.Popen(
            [sys.executable, "-c", _SAVE_THEN_STALL, str(ckpt)], cwd=REPO, env=env, stdout=output, stderr=output
        )
        try:
            deadline = time.monotonic() + 300
            while not (ckpt / "midway").exists():
                assert child.poll() is None, f"exit {child.returncode}\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.2)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(30)

    assert (ckpt / "step2").is_dir() and any((ckpt / "step2").iterdir())  # the save had begun
    assert not (ckpt / "step2" / resume.COMPLETE).exists()
    assert (ckpt / resume.LATEST).read_text() == "step1"
    assert json.loads((ckpt / "step1" / resume.COMPLETE).read_text())["step"] == 1
    found = resume.find_checkpoint(ckpt)
    assert (found.tag, found.step, found.incomplete) == ("step1", 1, ("step2",))


# ---- a real Slurm cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """slurmctld + slurmd (+ munged) for this module, stopped by pid at the end."""
    missing = missing_binaries()
    problem = None
    if missing:
        problem = (
            f"no Slurm test cluster: {', '.join(missing)} not installed "
            "(apt-get install slurm-wlm munge: Debian's Slurm 22.05)"
        )
    elif os.geteuid() != 0:
        problem = "no Slurm test cluster: starting slurmctld, slurmd and munged here needs root"
    if problem:
        if os.environ.get("LEMO_REQUIRE_SLURM") == "1":
            pytest.fail(f"{problem}; LEMO_REQUIRE_SLURM=1 requires it")
        pytest.skip(problem)
    slurm = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


@pytest.mark.slurm
@pytest.mark.slow
def test_resubmitted_then_requeued_job_continues_the_run(cluster, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"

    # 1. A first job: two ranks, two steps, from scratch (--resume auto finds nothing yet).
    first = submit(cluster, out, "--max-steps", "2")
    fields = finished(cluster, out, first, FIRST_JOB_TIMEOUT)
    context = job_logs(cluster, out, first)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), context
    assert steps(out) == [1, 2], context
    result = summary(out)
    assert (result["steps"], result["world_size"], result["resumed_from_step"]) == (2, 2, None)
    batch_log = (out / "logs" / f"slurm-{first}.out").read_text()
    assert f"lemo_ds slurm: job {first} attempt 0 on {cluster.node}: 2 ranks" in batch_log, batch_log
    assert f"lemo_ds slurm: job {first} attempt 0 done, status 0" in batch_log, batch_log
    rank_logs = out / "logs" / f"job{first}" / "attempt0"
    assert sorted(path.name for path in rank_logs.iterdir()) == ["rank0.log", "rank1.log"]
    rank0 = (rank_logs / "rank0.log").read_text()
    assert "--resume auto: no complete checkpoint" in rank0 and "lemo_ds: done: step 2" in rank0, rank0
    assert resume.find_checkpoint(ckpt).tag == "step2"

    # 2. As a save killed halfway would leave it: step3 without its marker, and 'latest' naming it.
    shutil.copytree(ckpt / "step2", ckpt / "step3", ignore=shutil.ignore_patterns(resume.COMPLETE))
    (ckpt / resume.LATEST).write_text("step3")

    # 3. A second submission resumes from step2. Once it has checkpointed step 4 it gets the signal Slurm
    #    sends two minutes before the time limit (--signal=B:USR1@120); the template requeues the job, and
    #    the next attempt resumes from the latest complete checkpoint.
    second = submit(cluster, out, "--max-steps", "12", "--save-every", "2")

    def saved_step4() -> bool:
        return (resume.find_checkpoint(ckpt).step or 0) >= 4

    until(saved_step4, JOB_TIMEOUT, "complete checkpoint of step 4", cluster, out, second)
    cluster.run("scancel", "--batch", "--signal=USR1", str(second))

    def requeued() -> bool:  # back in the queue once the killed attempt has finished completing
        fields = cluster.job(second)
        return (fields.get("Restarts"), fields.get("JobState")) == ("1", "PENDING")

    until(requeued, 60, "requeue", cluster, out, second)
    # Slurm holds a requeued job for two minutes (its begin time); let it start now (an update also runs the
    # scheduler). Not in the second of the requeue: slurmd refuses a job credential issued in the same second
    # as its revocation by the requeue ("Job credential revoked"), and the job would fail.
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={second}", "StartTime=now")
    fields = finished(cluster, out, second, JOB_TIMEOUT)
    context = job_logs(cluster, out, second)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), context
    assert steps(out) == list(range(1, 13)), context  # one record per step: none lost, none twice
    result = summary(out)
    resumed = result["resumed_from_step"]
    assert resumed >= 4 and resumed % 2 == 0, context
    assert (result["steps"], result["steps_this_run"], result["world_size"]) == (12, 12 - resumed, 2)

    attempt0 = (out / "logs" / f"job{second}" / "attempt0" / "rank0.log").read_text()
    assert "'latest' names 'step3', which is not a complete checkpoint" in attempt0, attempt0
    assert "ignoring incomplete checkpoint without lemo_ds_complete.json: step3" in attempt0, attempt0
    assert f"resumed from {ckpt / 'step2'} at step 2 (4 rows consumed)" in attempt0, attempt0
    attempt1 = (out / "logs" / f"job{second}" / "attempt1" / "rank0.log").read_text()
    assert f"resumed from {ckpt / f'step{resumed}'} at step {resumed}" in attempt1, attempt1
    assert "lemo_ds: done: step 12" in attempt1, attempt1
    batch_log = (out / "logs" / f"slurm-{second}.out").read_text()
    assert f"time limit near: requeueing job {second}" in batch_log, batch_log
    assert f"lemo_ds slurm: job {second} attempt 1 done, status 0" in batch_log, batch_log


@pytest.mark.slurm
def test_a_dead_rank_ends_every_rank_of_the_job(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out, "--max-steps", "10000", "--no-save")
    # Rank 1 dies as soon as it exists: rank 0 would then wait for it at the rendezvous (or, later, in a
    # collective) until DEEPSPEED_TIMEOUT, 10 minutes, were it not for srun --kill-on-bad-exit.
    until(lambda: sorted(cluster.task_pids(job)) == [0, 1], JOB_TIMEOUT, "two tasks", cluster, out, job)
    pids = cluster.task_pids(job)
    for pid in pids[1]:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    fields = finished(cluster, out, job, 120)
    assert fields["JobState"] == "FAILED", job_logs(cluster, out, job)
    assert time.monotonic() - killed < 60, job_logs(cluster, out, job)
    assert not [pid for pid in pids[0] if _alive(pid)], "rank 0 outlived the job"
    batch_log = (out / "logs" / f"slurm-{job}.out").read_text()
    assert "lemo_ds slurm: srun exited with status" in batch_log, batch_log
    assert f"srun: error: {cluster.node}: task 1: Killed" in batch_log, batch_log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
