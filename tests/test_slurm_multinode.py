"""The README's Slurm job on two nodes, and what goes wrong between hosts: a real Slurm cluster whose nodes are
network namespaces of this machine (tests/slurm_netns.py: slurmctld, one slurmd per node, a private munged; a
management and a data network on bridges; needs root).

launch/slurm/submit.sh and train.sbatch run as they are, CPU ranks over gloo, ZeRO-3, lemo on:
* the job on two nodes x two ranks trains the loss curve of a one-node job of four ranks on the same rows;
* a node dies mid-run (links down, then its slurmd and ranks killed): the other node's ranks stop within
  1.5 x --peer-timeout with one line naming the lost node, Slurm marks the node down and requeues the job, and the
  next attempt continues on the node left, on half the ranks, from the last complete checkpoint (through
  DeepSpeed's universal checkpoint), every step recorded once;
* the data link of one node goes down during a step (one rank per node): rank 0 stops within the same time with the
  line naming the node cut off, srun ends the other, and 'latest' still names a complete, undamaged checkpoint;
* the checkpoint folder is read-only on one node (a bind mount in that node's mount namespace; one rank per node):
  every rank refuses before training, naming the node.

The jobs' DS_CONFIG is ds_configs/zero3_lemo.json with ``stage3_max_reuse_distance`` 0: DeepSpeed's first step
with a complete ZeRO-3 trace otherwise scans the rest of the trace for every module it releases (the whole model is
within the default reuse distance of 1e9 parameters), seconds of CPU per rank on the tiny model; the numbers are the
same (parameters are only released sooner), the group's time in CI is not.

The group shares one cluster (module fixture) and is marked ``slurm``; it is skipped, with the reason, where the
binaries, root or network namespaces are missing, unless LEMO_REQUIRE_SLURM=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from launch_util import REPO
from slurm_cluster import missing_binaries
from slurm_jobs import finished, job_logs, losses, rank_log, steps, submit, summary, until
from slurm_netns import Network, NodesCluster, namespaces_problem, wait_gone

from lemo_ds.training import checkpoint_files, peers, resume

pytestmark = pytest.mark.slurm

# The first DeepSpeed job on a fresh machine compiles a CPU comm op (~60 s) before it trains.
FIRST_JOB_TIMEOUT = 480
JOB_TIMEOUT = 300
PEER_TIMEOUT = 8  # --peer-timeout of the fault tests, in seconds
# From a node's loss to the exit of the ranks left: what lemo_ds.training.peers states, and a 2-core machine's slack.
STOP_WITHIN = peers.STOP_WITHIN * PEER_TIMEOUT + 8
TWO_BY_TWO = {"nodes": "2", "tasks_per_node": 2}
TWO_BY_ONE = {"nodes": "2", "tasks_per_node": 1}  # where one rank per node shows it: fewer ranks to start


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes lemo1 and lemo2, for this module; everything removed at the end, and checked to be."""
    problem = None
    missing = missing_binaries()
    if missing:
        problem = f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge: Debian's Slurm 22.05)"
    else:
        problem = namespaces_problem()
    if problem:
        problem = f"no two-node Slurm test cluster: {problem}"
        if os.environ.get("LEMO_REQUIRE_SLURM") == "1":
            pytest.fail(f"{problem}; LEMO_REQUIRE_SLURM=1 requires it")
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("slurm-nodes")
    network = Network(2, root)
    slurm = NodesCluster(root, network)
    try:
        network.create()
        slurm.start()
        yield slurm
    finally:
        try:
            slurm.stop()
        finally:
            network.remove()
    assert not network.leftovers(), network.leftovers()


@pytest.fixture(autouse=True)
def all_nodes_up(cluster):
    """Each test starts on the whole cluster, whatever the one before left (a node it killed, a link it cut)."""
    cluster.reset()


@pytest.fixture(scope="module")
def submit_job(cluster, tmp_path_factory):
    """launch/slurm/submit.sh to the cluster: ``submit_job(out, *train_args, nodes=..., tasks_per_node=...)``."""
    config = json.loads((REPO / "ds_configs" / "zero3_lemo.json").read_text())
    config["zero_optimization"]["stage3_max_reuse_distance"] = 0  # see the module's docstring
    path = tmp_path_factory.mktemp("config") / "zero3_lemo.json"
    path.write_text(json.dumps(config))

    def submit_job(out, *train_args: str, **shape) -> int:
        # One thread per rank whatever the machine: the one-node and the two-node shapes then compute alike, and the
        # nodes (which share this machine's cores) are not oversubscribed.
        return submit(cluster, out, *train_args, DS_CONFIG=str(path), OMP_NUM_THREADS="1", **shape)

    return submit_job


def test_two_nodes_train_the_loss_curve_of_one_node(cluster, submit_job, tmp_path):
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    # Full fine-tuning: under LoRA (B initialised to 0) and the warm-up's first rates (2e-5), the first steps' losses
    # hardly move; with every weight trained, each step's loss after the first depends on the gradients reduced across
    # the nodes. Both jobs at once (the nodes have room for both): the machine's two cores are never both idle.
    args = ("--max-steps", "3", "--lora-r", "0", "--no-save")
    main = submit_job(two_nodes, *args, **TWO_BY_TWO)
    reference = submit_job(one_node, *args, nodes="1", tasks_per_node=4)
    fields = finished(cluster, two_nodes, main, FIRST_JOB_TIMEOUT)
    context = job_logs(cluster, two_nodes, main)
    assert (fields["JobState"], fields["ExitCode"], fields["NodeList"]) == ("COMPLETED", "0:0", "lemo[1-2]"), context
    batch_log = (two_nodes / "logs" / f"slurm-{main}.out").read_text()
    port = 20000 + main % 20000
    assert f"job {main} attempt 0 on lemo[1-2]: 4 ranks, rendezvous lemo1:{port}" in batch_log, context
    fields = finished(cluster, one_node, reference, JOB_TIMEOUT)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), job_logs(cluster, one_node, reference)

    for out in (two_nodes, one_node):
        result = summary(out)
        assert (result["world_size"], result["zero_stage"], result["steps"], result["lora_r"]) == (4, 3, 3, 0), result
        assert result["mean_keep_ratio"] < 1, result  # lemo on: blocks were skipped
    assert steps(two_nodes) == steps(one_node) == [1, 2, 3]
    # The same rows, the same ranks, one gloo ring over one host or two: the same numbers, to the last bit.
    assert losses(two_nodes) == losses(one_node), (losses(two_nodes), losses(one_node))


def test_a_dead_node_stops_the_job_and_the_requeued_job_continues_on_the_node_left(cluster, submit_job, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    max_steps = 3
    args = ("--max-steps", str(max_steps), "--save-every", "1", "--peer-timeout", str(PEER_TIMEOUT))
    job = submit_job(out, *args, **TWO_BY_TWO)
    until(lambda: resume.find_checkpoint(ckpt).tag is not None, JOB_TIMEOUT, "first checkpoint", cluster, out, job)
    pids = cluster.task_pids(job)
    assert sorted(pids) == [0, 1, 2, 3], pids
    cluster.kill("lemo2")
    killed = time.monotonic()

    # The ranks on lemo1 notice within the timeout and stop, each with the one line.
    survivors = pids[0] + pids[1]
    left = wait_gone(survivors, STOP_WITHIN)
    context = job_logs(cluster, out, job)
    assert not left, f"ranks 0, 1 still running {time.monotonic() - killed:.0f} s after lemo2 died\n{context}"
    for rank in (0, 1):
        errors = [line for line in rank_log(out, job, rank).splitlines() if line.startswith("lemo_ds: error:")]
        assert len(errors) == 1 and "lost node lemo2 (ranks 2, 3): no heartbeat for 8 s" in errors[0], context
    latest = resume.find_checkpoint(ckpt)
    assert latest.tag == (ckpt / resume.LATEST).read_text() and latest.step < max_steps, context
    assert f"during step {latest.step + 1}; " in errors[0] and f"'latest' still names {latest.tag}" in errors[0]

    # Slurm finds lemo2 down and requeues the job (--requeue). A requeued job keeps the size of its first allocation
    # (2 nodes, 4 tasks); with no other node to take lemo2's place, the user lets it go on with the node left.
    until(lambda: cluster.job(job).get("Restarts") == "1", 120, "requeue", cluster, out, job)
    assert cluster.node_states()["lemo2"].startswith("down"), cluster.node_states()
    batch_log = (out / "logs" / f"slurm-{job}.out").read_text()
    # Either rank of lemo1 may be the first srun reports (task 0, task 1 or tasks 0-1): both stop with exit code 4.
    assert re.search(r"srun: error: lemo1: tasks? (0|1|0-1): Exited with exit code 4", batch_log), context
    assert f"JOB {job} ON lemo1 CANCELLED AT" in batch_log and "DUE TO NODE FAILURE" in batch_log, context
    # Slurm holds a requeued job for two minutes; the test lets it start as soon as the first attempt's srun is gone
    # (proctrack/linuxproc lets srun outlive its batch script by seconds, and on its way out it would cancel "step
    # 0" of the job, the new attempt's), and not in the second of the requeue: slurmd refuses a credential issued
    # then (test_slurm.py).
    until(lambda: not any(line.startswith("srun") for line in cluster.commands("lemo1")), 60, "srun gone", cluster,
          out, job)  # fmt: skip
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=2", "StartTime=now")
    until(lambda: cluster.state(job) == "RUNNING", 60, "second attempt", cluster, out, job)
    assert cluster.job(job)["NodeList"] == "lemo1", cluster.job(job)
    cluster.revive("lemo2")  # back in service while the job runs on without it
    fields = finished(cluster, out, job, JOB_TIMEOUT)
    context = job_logs(cluster, out, job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), context
    assert steps(out) == list(range(1, max_steps + 1)), context  # every step once: none lost, none twice
    result = summary(out)
    assert (result["world_size"], result["resumed_from_step"], result["steps"]) == (2, latest.step, max_steps)
    attempt1 = rank_log(out, job, 0, attempt=1)
    assert (
        f"resumed from {ckpt / latest.tag} at step {latest.step} ({latest.step * 4} rows consumed), saved by 4 "
        "ranks, on 2 through DeepSpeed's universal checkpoint" in attempt1
    ), context
    batch_log = (out / "logs" / f"slurm-{job}.out").read_text()
    assert f"job {job} attempt 1 on lemo1: 2 ranks" in batch_log, context


def test_a_link_down_during_a_step_stops_every_rank_and_latest_stays(cluster, submit_job, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    job = submit_job(out, "--max-steps", "1000", "--save-every", "1", "--peer-timeout", str(PEER_TIMEOUT), **TWO_BY_ONE)
    until(lambda: resume.find_checkpoint(ckpt).tag is not None, JOB_TIMEOUT, "first checkpoint", cluster, out, job)
    pids = cluster.task_pids(job)
    assert sorted(pids) == [0, 1], pids
    cluster.network.set_link("lemo2", "data", up=False)  # Slurm's own network stays up
    cut = time.monotonic()
    try:
        left = wait_gone([pid for rank_pids in pids.values() for pid in rank_pids], STOP_WITHIN)
        fields = finished(cluster, out, job, 60)
    finally:
        cluster.network.set_link("lemo2", "data", up=True)
    context = job_logs(cluster, out, job)
    assert not left, f"{left} still running {time.monotonic() - cut:.0f} s after the link went down\n{context}"
    # Rank 0 sees every rank: it stops with the line naming the node cut off (exit 4), srun ends the rank on the
    # other side, and the job fails with srun's status.
    errors = [line for line in rank_log(out, job, 0).splitlines() if "lemo_ds: error:" in line]
    assert len(errors) == 1 and "lemo_ds: error: lost node lemo2 (rank 1): no heartbeat" in errors[0], context
    batch_log = (out / "logs" / f"slurm-{job}.out").read_text()
    assert "srun: error: lemo1: task 0: Exited with exit code 4" in batch_log, context
    status = re.search(r"lemo_ds slurm: srun exited with status (\d+)", batch_log)
    assert status and (fields["JobState"], fields["ExitCode"]) == ("FAILED", f"{status[1]}:0"), context
    latest = resume.find_checkpoint(ckpt)
    assert latest.tag == (ckpt / resume.LATEST).read_text(), context
    assert f"during step {latest.step + 1}; " in errors[0] and f"'latest' still names {latest.tag}" in errors[0]
    manifest = latest.markers[latest.tag]["files"]
    assert checkpoint_files.damaged_files(ckpt / latest.tag, manifest, 0, 1) == [], context


def test_a_checkpoint_folder_one_node_cannot_write_is_refused_on_every_rank(cluster, submit_job, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True)
    with cluster.read_only("lemo2", ckpt):
        job = submit_job(out, "--max-steps", "3", **TWO_BY_ONE)
        fields = finished(cluster, out, job, JOB_TIMEOUT)
    context = job_logs(cluster, out, job)
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "2:0"), context
    for rank in (0, 1):  # rank 0 on lemo1, which can write there, too
        errors = [line for line in rank_log(out, job, rank).splitlines() if line.startswith("lemo_ds: error:")]
        assert len(errors) == 1, context
        expected = f"lemo_ds: error: --output-dir {ckpt}: cannot write there on node lemo2 (rank 1): "
        assert errors[0].startswith(expected), errors[0]
        assert "Read-only file system, while node lemo1 can;" in errors[0], errors[0]
    assert not (out / "metrics.jsonl").exists() and list(ckpt.iterdir()) == [], context
