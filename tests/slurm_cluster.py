"""A real one-node Slurm cluster for the tests, from Debian's packages (slurm-wlm, munge; Slurm 22.05).

The configuration is the one recorded as working on the CPU test machine: SlurmUser=root, auth/munge,
proctrack/linuxproc, task/none, cons_tres on cores, ReturnToService=2, and no cgroup.conf (slurmd 22.05 does
not start with ``CgroupPlugin=disabled``). Everything Slurm writes (slurm.conf, state, spool, logs, pid files)
lives in a temporary folder that SLURM_CONF points the daemons and clients at; the daemons listen on free
ports and run in the foreground, so they are stopped by their pids. Each cluster runs a munged of its own on the
system's key (/etc/munge/munge.key) with its socket in a folder of its own (slurm.conf's AuthInfo=socket=...): two
clusters of two pytest-xdist workers, or of two checkouts, never stop each other's munged. Needs root.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "munged", "munge", "unmunge")
# States after which a job runs no more (a requeued job passes through REQUEUED and PENDING instead).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
MUNGE_KEY = Path("/etc/munge/munge.key")


def which(name: str) -> str | None:
    """Daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if which(name) is None]


class SlurmError(RuntimeError):
    pass


class Cluster:
    """slurmctld + slurmd on this machine, one partition "debug" with one node of all its cores."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]  # slurmd's node name: the short host name
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # munged's own folder: under /tmp, not the test's (root-only) temporary folder, which user munge cannot enter.
        self.munge_dir: Path | None = None
        self._daemons: dict[str, subprocess.Popen] = {}
        self._outputs: list = []  # the daemons' stdout files, closed at stop()
        self.jobs: list[int] = []  # submitted through submitted(); cancelled at stop()

    # ---- start and stop ------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        self._start_munge(timeout)
        self._write_conf()
        self._daemons["slurmctld"] = self._spawn("slurmctld", "-D")
        self._until(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout, "slurmctld")
        self._daemons["slurmd"] = self._spawn("slurmd", "-D", "-N", self.node)
        self._until(lambda: self.node_state() == "idle", timeout, f"node {self.node} idle")

    def stop(self) -> None:
        """Cancel the jobs submitted here, then stop the daemons started here (by pid)."""
        try:
            if self.jobs and "slurmctld" in self._daemons:
                self.run("scancel", *map(str, self.jobs), check=False)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and any(
                    self.job(job).get("JobState") not in FINISHED | {None} for job in self.jobs
                ):
                    time.sleep(0.5)
        finally:
            # slurmd first (every node's), munged last: each daemon still finds the ones it reports to.
            for name in sorted(self._daemons, key=lambda name: (name == "munged", name == "slurmctld")):
                _terminate(self._daemons.pop(name))
            for handle in self._outputs:
                handle.close()
            if self.munge_dir is not None:
                shutil.rmtree(self.munge_dir, ignore_errors=True)

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def _start_munge(self, timeout: float) -> None:
        if not MUNGE_KEY.exists():  # what the munge package's postinst would have made
            MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
            MUNGE_KEY.write_bytes(secrets.token_bytes(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        self.munge_dir = Path(tempfile.mkdtemp(prefix="lemo-munge-"))
        self.munge_dir.chmod(0o755)  # munged refuses a socket folder that others may write
        shutil.chown(self.munge_dir, "munge", "munge")
        log = open(self.root / "munged.out", "wb")  # open until stop(): the daemon writes to it
        self._outputs.append(log)
        files = {"socket": "munge.socket", "pid-file": "munged.pid", "log-file": "munged.log", "seed-file": "seed"}
        self._daemons["munged"] = subprocess.Popen(
            [which("munged"), "--foreground", *(f"--{flag}={self.munge_dir / name}" for flag, name in files.items())],
            user="munge",
            group="munge",
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._until(self._munge_works, timeout, "munged")

    def _munge_works(self) -> bool:
        socket_flag = f"--socket={self.munge_socket}"
        encoded = subprocess.run([which("munge"), socket_flag, "-n"], capture_output=True, timeout=10)
        if encoded.returncode != 0:
            return False
        decoded = subprocess.run([which("unmunge"), socket_flag], input=encoded.stdout, capture_output=True, timeout=10)
        return decoded.returncode == 0

    def _write_conf(self) -> None:
        for sub in ("state", f"spool/{self.node}", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cpus = len(os.sched_getaffinity(0))
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf.write_text(
            f"""\
{self.common_conf(ctld_host=self.node, slurmd_port=_free_port())}
NodeName={self.node} CPUs={cpus} RealMemory={min(20000, memory_mb)} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def common_conf(self, ctld_host: str, slurmd_port: int) -> str:
        """slurm.conf but for its nodes and partitions: one slurmd per node name (%n) may share this folder."""
        return f"""\
ClusterName=lemotest
SlurmctldHost={ctld_host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
SlurmctldPort={_free_port()}
SlurmdPort={slurmd_port}
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool" / "%n"}
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root / "slurmd.%n.pid"}
SlurmctldLogFile={self.root / "log" / "slurmctld.log"}
SlurmdLogFile={self.root / "log" / "slurmd.%n.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# Cancelled and requeued steps get SIGKILL 5 s after SIGTERM (default 30): quicker test turnaround.
KillWait=5"""

    def _spawn(self, name: str, *args: str, prefix: tuple[str, ...] = (), label: str | None = None) -> subprocess.Popen:
        """Start a daemon in the foreground; ``prefix``: the command that runs it (on a node: slurm_netns.py)."""
        out = open(self.root / "log" / f"{label or name}.out", "wb")  # open until stop(): the daemon writes to it
        self._outputs.append(out)
        return subprocess.Popen(
            [*prefix, which(name), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the test run reaches the daemons through stop(), in order
        )

    def _until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self._daemons.items():
                if process.poll() is not None:
                    raise SlurmError(f"{name} exited with status {process.returncode}\n{self.daemon_logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise SlurmError(f"{what}: not ready after {timeout:.0f} s\n{self.daemon_logs()}")

    # ---- clients ----------------------------------------------------------------------------------------------

    def run(self, *command: str, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [which(command[0]), *command[1:]], env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)}: exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def submitted(self, result: subprocess.CompletedProcess) -> int:
        """The job id an ``sbatch --parsable`` printed (as the last line), remembered for stop()."""
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines or not re.fullmatch(r"\d+(;\S+)?", lines[-1]):
            raise SlurmError(f"sbatch failed: exit {result.returncode}\n{result.stdout}{result.stderr}")
        job = int(lines[-1].split(";")[0])
        self.jobs.append(job)
        return job

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()

    def job(self, job: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Reason, Restarts, ExitCode, ...); {} once forgotten."""
        result = self.run("scontrol", "show", "job", "-o", str(job), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout)) if result.returncode == 0 else {}

    def state(self, job: int) -> str:
        return self.job(job).get("JobState", "UNKNOWN")

    def wait_for(self, job: int, states: set[str], timeout: float, why: str = "") -> dict[str, str]:
        """Poll until the job is in one of ``states``; SlurmError (with the logs) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job)
            if fields.get("JobState") in states:
                return fields
            if fields.get("JobState") in FINISHED:
                raise SlurmError(f"job {job} ended {fields.get('JobState')} while waiting for {states} {why}")
            if time.monotonic() > deadline:
                self.run("scancel", str(job), check=False)
                raise SlurmError(f"job {job}: not {states} after {timeout:.0f} s {why}: {fields}")
            time.sleep(0.5)

    def task_pids(self, job: int) -> dict[int, list[int]]:
        """The pids of each task (global rank) of a running job's steps (``scontrol listpids``)."""
        pids: dict[int, list[int]] = {}
        for line in self.run("scontrol", "listpids", str(job), check=False).stdout.splitlines()[1:]:
            fields = line.split()  # PID JOBID STEPID LOCALID GLOBALID
            if len(fields) == 5 and fields[4].isdigit():
                pids.setdefault(int(fields[4]), []).append(int(fields[0]))
        return pids

    def daemon_logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munged.out"]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _free_port() -> int:
    """On every interface (launch_env.free_port: loopback only): the daemons listen on the nodes' addresses."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _terminate(process: subprocess.Popen, grace: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
