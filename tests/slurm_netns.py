"""A real Slurm cluster of several nodes on one machine: each node a network namespace of its own.

Node ``lemo<i>`` is the network namespace ``lemo<tag>n<i>`` with two links, as a GPU cluster has two networks: a
management network that Slurm talks over (slurmctld in the root namespace, on the bridge's address) and a data
network that the ranks talk over (the rendezvous, gloo). Each link is a veth pair whose outer end is a port of
that network's bridge. The addresses are one private /24 that no route of this machine uses, made here and
removed at the end: the management network is its lower half, the data network its upper half. Nothing leaves
the machine (the bridges have no uplink).

Each slurmd runs in its node's network namespace and in a mount namespace of its own (``prefix``), which its job
steps and ranks inherit. There a hosts file of the node's (in the test's folder) is bind-mounted over /etc/hosts,
so names resolve per node as on a cluster: the node names to their data addresses (MASTER_ADDR is the first
node's name, launch/slurm/train.sbatch) and this machine's host name to the node's own data address (gloo binds
to the address of the host name). The machine's /etc/hosts is never touched. slurm.conf gives every node its
NodeAddr (management address), so Slurm resolves no names. (Not ``ip netns exec``: it mounts a sysfs of its own,
without the cgroup file systems that slurmd 22.05 will not start without.)

The nodes share the file system (the checkout, the Python environment, OUTPUT_DIR: as a cluster's shared file
system); a mount made in a node's mount namespace is that node's alone (``read_only``). A node dies (``kill``) by
losing both links, so nothing it sends arrives any more, and then every process in its namespace; ``revive``
brings it back. Needs root, iproute2 and Debian's slurm-wlm and munge.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from slurm_cluster import FINISHED, Cluster, SlurmError, which

IP = shutil.which("ip") or "/usr/sbin/ip"
NETWORKS = ("mgmt", "data")
# Where this test's /24 is chosen: 10.237.0.0/16, away from the usual 10.0.x and 10.1xx container networks.
POOL = ipaddress.ip_network("10.237.0.0/16")


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise SlurmError(f"{' '.join(command)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def namespaces_problem() -> str | None:
    """Why network namespaces, bridges and veth pairs cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in (IP, "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (iproute2, util-linux)"
    probe = f"lemoprobe{os.getpid()}"
    try:
        for command in (
            ("netns", "add", probe),
            ("link", "add", probe, "type", "bridge"),
            ("link", "add", f"{probe}v", "type", "veth", "peer", "name", "probe", "netns", probe),
        ):
            result = run(IP, *command, check=False)
            if result.returncode != 0:
                return f"ip {' '.join(command)}: {result.stderr.strip()}"
        return None
    finally:
        run(IP, "link", "del", probe, check=False)
        run(IP, "netns", "del", probe, check=False)  # its end of the veth pair goes with it, and so the other end


class Network:
    """The namespaces, bridges, veth pairs, addresses and hosts files of ``count`` nodes (``create``/``remove``)."""

    def __init__(self, count: int, folder: Path, tag: str | None = None) -> None:
        self.folder = Path(folder)  # the nodes' hosts files
        self.tag = tag or str(os.getpid())  # names of their own for two runs at once (at most 15 characters)
        self.nodes = [f"lemo{index}" for index in range(1, count + 1)]
        self.subnet: ipaddress.IPv4Network | None = None

    def namespace(self, node: str) -> str:
        return f"lemo{self.tag}n{self._index(node)}"

    def bridge(self, net: str) -> str:
        return f"lm{self.tag}{net[0]}"

    def veth(self, node: str, net: str) -> str:
        """The outer end of the node's link to ``net`` (its inner end is called ``net`` in the namespace)."""
        return f"lm{self.tag}{net[0]}{self._index(node)}"

    def address(self, node: str | None, net: str) -> str:
        """The node's address on ``net``; None: the controller's (the management bridge's) address."""
        half = list(self.subnet.subnets(new_prefix=25))[NETWORKS.index(net)]
        return str(half.network_address + (1 if node is None else 10 + self._index(node)))

    def hosts(self, node: str) -> Path:
        return self.folder / f"hosts.{node}"

    def prefix(self, node: str) -> tuple[str, ...]:
        """The command prefix that runs a command on ``node``: in its network namespace and a mount namespace of
        its own (mounts of the machine still reach it: slave propagation), with the node's hosts file."""
        return ("nsenter", f"--net=/run/netns/{self.namespace(node)}", "unshare", "--mount", "--propagation",
                "slave", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(self.hosts(node)))  # fmt: skip

    def _index(self, node: str) -> int:
        return self.nodes.index(node) + 1

    def create(self) -> None:
        self.subnet = _free_subnet(self.tag)
        for net in NETWORKS:
            run(IP, "link", "add", self.bridge(net), "type", "bridge")
            run(IP, "link", "set", self.bridge(net), "up")
        run(IP, "addr", "add", f"{self.address(None, 'mgmt')}/25", "dev", self.bridge("mgmt"))
        hostname = socket.gethostname()
        for node in self.nodes:
            ns = self.namespace(node)
            run(IP, "netns", "add", ns)
            run(IP, "-n", ns, "link", "set", "lo", "up")
            for net in NETWORKS:
                outer = self.veth(node, net)
                run(IP, "link", "add", outer, "type", "veth", "peer", "name", net, "netns", ns)
                run(IP, "link", "set", outer, "master", self.bridge(net), "up")
                run(IP, "-n", ns, "addr", "add", f"{self.address(node, net)}/25", "dev", net)
                run(IP, "-n", ns, "link", "set", net, "up")
            entries = [f"{self.address(node, 'data')} {node} {hostname}"]
            entries += [f"{self.address(other, 'data')} {other}" for other in self.nodes if other != node]
            # The same as IPv4-mapped IPv6 addresses: how the rendezvous store (a dual-stack socket) sees its clients,
            # whose names it looks up (with no name server in reach, a warning in every rank's log).
            entries += [f"::ffff:{entry}" for entry in entries]
            self.hosts(node).write_text("\n".join(["127.0.0.1 localhost", *entries, ""]))

    def remove(self) -> None:
        """Everything ``create`` made, as far as it got (each step on its own: one failure leaves no more behind)."""
        for node in self.nodes:
            ns = self.namespace(node)
            for pid in self.pids(node):  # a namespace goes once its last process has
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            run(IP, "netns", "del", ns, check=False)  # its veth pairs go with it
        for net in NETWORKS:
            run(IP, "link", "del", self.bridge(net), check=False)

    def pids(self, node: str) -> list[int]:
        result = run(IP, "netns", "pids", self.namespace(node), check=False)
        return [int(pid) for pid in result.stdout.split()]

    def set_link(self, node: str, net: str, up: bool) -> None:
        """The cable between ``node`` and ``net``'s bridge, plugged in or pulled out (the outer end: the node
        itself keeps its address, as a host whose link went down does)."""
        run(IP, "link", "set", self.veth(node, net), "up" if up else "down")

    def leftovers(self) -> list[str]:
        """What of this network still exists (the tests check teardown with it)."""
        found = [ns for ns in run(IP, "netns", "list").stdout.split() if ns.startswith(f"lemo{self.tag}n")]
        links = run(IP, "-o", "link", "show").stdout
        found += [name for name in (self.bridge(net) for net in NETWORKS) if f" {name}:" in links]
        return found


def _free_subnet(tag: str) -> ipaddress.IPv4Network:
    """A /24 of POOL that overlaps no address or route of this machine (another run's included)."""
    used = []
    for command in (("-4", "route", "show", "table", "all"), ("-4", "addr", "show")):
        for word in run(IP, *command, check=False).stdout.split():
            with contextlib.suppress(ValueError):
                if "." in word and word[0].isdigit():
                    used.append(ipaddress.ip_network(word, strict=False))
    candidates = list(POOL.subnets(new_prefix=24))
    start = int(tag) % len(candidates) if tag.isdigit() else 0
    for candidate in candidates[start:] + candidates[:start]:
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise SlurmError(f"no free /24 in {POOL}")


class NodesCluster(Cluster):
    """slurmctld in the root namespace and one slurmd per node of ``network``; one partition "debug" of them all.

    Each node declares ``cpus`` CPUs whatever the machine has (SlurmdParameters=config_overrides): the nodes
    share this machine's cores, and a job of four ranks on one node must fit beside one of two ranks per node, as on
    a cluster of bigger nodes.
    """

    def __init__(self, root: Path, network: Network, cpus: int = 6, slurmd_timeout: int = 10) -> None:
        super().__init__(root)
        self.network = network
        self.nodes = network.nodes
        self.cpus = cpus
        self.slurmd_timeout = slurmd_timeout

    def start(self, timeout: float = 60) -> None:
        self._start_munge(timeout)
        self._write_conf()
        self._daemons["slurmctld"] = self._spawn("slurmctld", "-D")
        self._until(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout, "slurmctld")
        for node in self.nodes:
            self._start_slurmd(node)
        self._until(lambda: set(self.node_states().values()) == {"idle"}, timeout, "every node idle")

    def _start_slurmd(self, node: str) -> None:
        self._daemons[f"slurmd.{node}"] = self._spawn(
            "slurmd", "-D", "-N", node, prefix=self.network.prefix(node), label=f"slurmd.{node}"
        )

    def _write_conf(self) -> None:
        for sub in ("state", "log", *(f"spool/{node}" for node in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        controller = f"{socket.gethostname().split('.')[0]}({self.network.address(None, 'mgmt')})"
        nodes = "\n".join(
            f"NodeName={node} NodeAddr={self.network.address(node, 'mgmt')} CPUs={self.cpus} RealMemory=4000 "
            "State=UNKNOWN"
            for node in self.nodes
        )
        self.conf.write_text(
            f"""\
{self.common_conf(ctld_host=controller, slurmd_port=6818)}
SlurmdParameters=config_overrides
# A node that stops answering is DOWN after this many seconds (default 300), and its jobs are requeued.
SlurmdTimeout={self.slurmd_timeout}
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def node_states(self) -> dict[str, str]:
        """Each node's state as sinfo prints it (idle, alloc, mix, down*, ...)."""
        lines = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        return dict(line.split() for line in lines if len(line.split()) == 2)

    def task_pids(self, job: int) -> dict[int, list[int]]:
        """The pids of each task (global rank) of a running job, on every node that is up (``scontrol listpids``
        asks the slurmstepd of the node it runs on: it runs in each node's namespace)."""
        pids: dict[int, list[int]] = {}
        for node in self.nodes:
            if f"slurmd.{node}" not in self._daemons:
                continue
            result = subprocess.run(
                [*self.network.prefix(node), which("scontrol"), "listpids", str(job)], env=self.env,
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            for line in result.stdout.splitlines()[1:]:
                fields = line.split()  # PID JOBID STEPID LOCALID GLOBALID; the batch script's step is "batch"
                if len(fields) == 5 and fields[2].isdigit() and fields[4].isdigit():
                    pids.setdefault(int(fields[4]), []).append(int(fields[0]))
        return pids

    def commands(self, node: str) -> list[str]:
        """The command lines of the processes running on ``node``."""
        return [_command(pid) for pid in self.network.pids(node) if _running(pid)]

    def slurmd_pid(self, node: str) -> int:
        return self._daemons[f"slurmd.{node}"].pid

    # ---- faults -------------------------------------------------------------------------------------------------

    def kill(self, node: str) -> None:
        """The node dies: first its links go down (nothing it sends arrives any more, no connection of it is
        closed in order), then every process in it is killed, slurmd included."""
        for net in NETWORKS:
            self.network.set_link(node, net, up=False)
        for pid in self.network.pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        daemon = self._daemons.pop(f"slurmd.{node}")
        daemon.wait(30)

    def revive(self, node: str, timeout: float = 60) -> None:
        """The node is back: links up, slurmd started; ReturnToService=2 makes it idle once it registers."""
        for net in NETWORKS:
            self.network.set_link(node, net, up=True)
        self._start_slurmd(node)
        self._until(lambda: self.node_states().get(node) == "idle", timeout, f"{node} idle again")

    def reset(self, timeout: float = 90) -> None:
        """Every node up and idle, no job of an earlier test left (after a test that failed halfway)."""
        running = [str(job) for job in self.jobs if self.job(job).get("JobState") not in FINISHED | {None}]
        if running:
            self.run("scancel", *running, check=False)
        for node in self.nodes:
            for net in NETWORKS:
                self.network.set_link(node, net, up=True)
            if f"slurmd.{node}" not in self._daemons:
                self._start_slurmd(node)
        self._until(lambda: set(self.node_states().values()) == {"idle"}, timeout, "every node idle")

    @contextlib.contextmanager
    def read_only(self, node: str, folder: Path) -> Iterator[None]:
        """``folder`` is read-only on ``node`` alone while the block runs: a read-only bind mount in the mount
        namespace of that node's slurmd, which its job steps and ranks inherit."""
        enter = ("nsenter", f"--target={self.slurmd_pid(node)}", "--mount", "--")
        run(*enter, "mount", "--bind", str(folder), str(folder))
        try:
            run(*enter, "mount", "-o", "remount,bind,ro", str(folder))
            yield
        finally:
            run(*enter, "umount", str(folder), check=False)


def wait_gone(pids: list[int], timeout: float) -> list[str]:
    """What of ``pids`` still runs after ``timeout`` s: each as "pid: command line" (empty: all gone)."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if _running(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if _running(pid)]
    return [f"{pid}: {_command(pid)}" for pid in alive]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a process that ended but was not yet reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


__all__ = ["NETWORKS", "Network", "NodesCluster", "namespaces_problem", "which", "wait_gone"]
