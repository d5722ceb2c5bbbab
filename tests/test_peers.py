"""lemo_ds.training.peers: the heartbeat through the rendezvous store that stops a job's ranks when a node is lost.

Real TCPStores and threads in this process, one PeerWatch per simulated rank; ``exit`` records the status instead of
ending the test process. A silent link is a real TCP relay that stops relaying without closing anything, as a cable
pulled out. (The whole path, on ranks of a Slurm job whose node dies or whose link goes down: test_slurm_multinode.)
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from lemo_ds.training import peers

TIMEOUT = 1.0  # --peer-timeout of these tests, in seconds


class Ranks:
    """PeerWatch instances of one job in this process, each with what it printed and the status it exited with."""

    def __init__(self, nodes: list[str], port: int) -> None:
        self.nodes = nodes
        self.port = port
        self.lines: dict[int, list[str]] = {}
        self.exits: dict[int, int] = {}
        self.watches: list[peers.PeerWatch] = []

    def start(self, rank: int, port: int | None = None) -> peers.PeerWatch:
        watch = peers.PeerWatch(
            rank, self.nodes, TIMEOUT, after=lambda: "'latest' still names step4",
            write=self.lines.setdefault(rank, []).append,
            connect=lambda: dist.TCPStore("127.0.0.1", port or self.port, is_master=False),
            exit=lambda status: self.exits.setdefault(rank, status),
        )  # fmt: skip
        self.watches.append(watch.start())
        return watch

    def wait_exits(self, ranks: set[int], within: float) -> float:
        started = time.monotonic()
        while set(self.exits) < ranks and time.monotonic() - started < within:
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        for watch in self.watches:
            watch.stop()


@pytest.fixture
def store():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield server


def test_a_silent_rank_stops_every_rank_left_naming_its_node(store):
    ranks = Ranks(["node1", "node1", "node2", "node2"], store.port)
    try:
        ranks.start(0).phase = "step 5"
        ranks.start(1)
        # Ranks 2 and 3 (node2) beat once, a moment apart, and then never again: the node died.
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False)
        client.add("lemo_ds/peers/beat/3", 1)
        time.sleep(0.3)
        client.add("lemo_ds/peers/beat/2", 1)
        took = ranks.wait_exits({0, 1}, within=5)
    finally:
        ranks.stop()
    assert ranks.exits == {0: peers.EXIT_CODE, 1: peers.EXIT_CODE}
    assert took < peers.STOP_WITHIN * TIMEOUT + 1
    expected = (
        "lemo_ds: error: lost node node2 (ranks 2, 3): no heartbeat for 1 s (--peer-timeout) during step 5; down or "
        "cut off from node node1; 'latest' still names step4"
    )
    assert ranks.lines == {0: [expected], 1: [expected]}  # rank 1 says rank 0's line, before either exits


def test_ranks_that_end_normally_are_not_lost(store):
    ranks = Ranks(["node1", "node2"], store.port)
    try:
        ranks.start(0)
        ranks.start(1).stop()  # rank 1 is done first; rank 0 has more to do
        ranks.wait_exits({0}, within=3 * TIMEOUT)
    finally:
        ranks.stop()
    assert ranks.exits == {} and not any(ranks.lines.values())


class SilentRelay:
    """A TCP relay to ``port`` that can go silent: it stops passing bytes on and closes nothing."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.silent = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pass, args=(source, sink), daemon=True).start()

    def _pass(self, source: socket.socket, sink: socket.socket) -> None:
        while data := source.recv(65536):
            if self.silent.is_set():
                threading.Event().wait()  # a pulled cable: the bytes go nowhere and nobody is told
            sink.sendall(data)


def test_a_rank_cut_off_from_rank_0s_node_stops_naming_it(store):
    relay = SilentRelay(store.port)
    ranks = Ranks(["node1", "node2"], store.port)
    try:
        ranks.start(0)
        ranks.start(1, port=relay.port).phase = "step 7"
        time.sleep(0.5)
        relay.silent.set()  # between rank 1 and the store only: rank 0 finds rank 1 silent, and says so first
        ranks.wait_exits({0, 1}, within=5)
    finally:
        ranks.stop()
    assert ranks.exits == {0: peers.EXIT_CODE, 1: peers.EXIT_CODE}
    assert ranks.lines[0] == [
        "lemo_ds: error: lost node node2 (rank 1): no heartbeat for 1 s (--peer-timeout) during setup; down or cut off "
        "from node node1; 'latest' still names step4"
    ]
    (line,) = ranks.lines[1]
    assert line.startswith(
        "lemo_ds: error: lost contact with node node1, which holds the job's rendezvous store (rank 0): no answer for "
    ) and line.endswith("s (--peer-timeout 1) during step 7; it is down or cut off from node node2; 'latest' still "
                        "names step4")  # fmt: skip


def test_ranks_are_named_with_runs_as_ranges():
    from lemo_ds.distributed import describe_ranks

    assert [describe_ranks(r) for r in ([2], [3, 2], [8, 9, 10, 11], [0, 8, 9, 10, 15])] == [
        "rank 2", "ranks 2, 3", "ranks 8-11", "ranks 0, 8-10, 15"
    ]  # fmt: skip
