"""Lost peers: a node that dies, or whose network goes silent, stops the job's other ranks within a timeout.

A rank waiting in a collective for a peer that will never answer waits until the collective timeout (gloo and NCCL:
DEEPSPEED_TIMEOUT, 10 minutes in launch/slurm/train.sbatch, DeepSpeed's default 30), and says then only that an
operation timed out; a dead host closes no connection, so nothing tells it sooner. That timeout cannot be short:
it also bounds the collectives that legitimately wait long (rank 0 converting or writing a checkpoint while the
others wait at its barrier). So liveness is watched apart from the collectives, by a heartbeat through the job's
rendezvous store (torch.distributed's TCPStore on rank 0, at MASTER_ADDR:MASTER_PORT), on a connection of its own:

* every rank adds to its counter ``lemo_ds/peers/beat/<rank>`` every timeout/4 seconds, from a thread of its own
  (collectives release the GIL, so it beats while the main thread waits in one);
* rank 0 reads all counters; a rank whose counter has not moved for ``timeout`` seconds is lost: rank 0 posts one
  line naming its node and ranks under ``lemo_ds/peers/lost``, which every rank reads at its next beat; it prints
  the line and waits (two beats at most) until the ranks left have read it, so that each has said it before its
  exit takes the store with it (and srun --kill-on-bad-exit ends the ranks still running);
* a rank whose own store operations stop answering has lost rank 0's node (a TCPStore client waits forever on a
  silent connection: a second thread judges by the time of the last answer). It waits two beats longer than rank 0
  does, so that where rank 0 is alive (a link down: each side sees the other go silent) rank 0, which sees every
  rank, speaks first, and the ranks cut off from it are ended by srun.

Every rank left thus stops within 1.5 x ``timeout`` of the loss (``STOP_WITHIN``).

Either way the rank prints that one line ("lemo_ds: error: ...") and exits with EXIT_CODE at once (os._exit: the
main thread may be blocked in a collective that nothing can interrupt). Nothing is saved then: a checkpoint is
only marked complete, and 'latest' only moved, after every rank has written its share (lemo_ds.training.resume),
so 'latest' still names the last complete checkpoint. A rank that ends normally says so first (counter -1), so
ranks that finish at different moments are not taken for lost; a store that is gone (its connection closed or
refused: rank 0's process ended, its host still up) is no loss either: the collectives report a peer that crashed,
and srun --kill-on-bad-exit ends the rest.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch

from lemo_ds import distributed
from lemo_ds.errors import write_line
from lemo_ds.training import launch_env

EXIT_CODE = 4  # launch/train.py's status for a stop on a lost peer (2: bad input, 3: a stop of the run itself)
_KEY = "lemo_ds/peers/"
_LEFT = -1  # a counter set to this: the rank ended normally
STOP_WITHIN = 1.5  # x --peer-timeout: the longest a rank left takes to stop after a loss (beats every timeout/4)
_DEFAULT_STORE_TIMEOUT = timedelta(minutes=10)  # for the connection itself; liveness is judged by ``timeout``


class PeerWatch:
    """The heartbeat of one rank (``start``/``stop``). ``nodes``: every rank's node name, in rank order; ``phase``:
    what the rank is doing (the training loop sets it: "step 5"), for the message; ``after``: what the message
    ends with (where the run stands, what to do), read when a loss is found; ``write``: prints the line (beside a
    progress bar); ``before_exit``: run just before the process exits on a loss."""

    def __init__(
        self,
        rank: int,
        nodes: Sequence[str],
        timeout: float,
        after: Callable[[], str],
        before_exit: Callable[[], None] = lambda: None,
        write: Callable[[str], None] = write_line,
        connect: Callable[[], torch.distributed.Store] | None = None,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.rank = rank
        self.nodes = list(nodes)
        self.timeout = timeout
        self.after = after
        self.before_exit = before_exit
        self.write = write
        self.phase = "setup"
        self._connect = connect or _store_from_env
        self._exit = exit
        self._period = max(timeout / 4, 0.25)
        self._stopping = threading.Event()
        self._reported = threading.Lock()
        self._last_answer = time.monotonic()
        self._threads: list[threading.Thread] = []

    def start(self) -> PeerWatch:
        store = self._connect()
        store.add(self._beat_key(self.rank), 1)  # before the threads: the rendezvous store answers right now
        self._last_answer = time.monotonic()
        self._threads = [
            threading.Thread(target=self._beat, args=(store,), name="lemo_ds-peers-beat", daemon=True),
            threading.Thread(target=self._judge, name="lemo_ds-peers-judge", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """This rank ends normally: no more judging, and the beat thread tells rank 0 (if it still can)."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=min(2 * self._period, 5))  # a beat blocked on a silent store is a daemon: left behind

    # ---- the two threads ---------------------------------------------------------------------------------------

    def _beat(self, store: torch.distributed.Store) -> None:
        world_size = len(self.nodes)
        keys = [self._beat_key(rank) for rank in range(world_size)]
        seen = [0] * world_size
        moved = [time.monotonic()] * world_size  # a rank gets ``timeout`` from the start to beat a first time
        try:
            if self.rank == 0:
                for key in keys:  # add(key, 0): the counter, made (0) where its rank has not beaten yet
                    store.add(key, 0)
            while not self._stopping.wait(self._period):
                store.add(keys[self.rank], 1)
                if self.rank == 0:
                    lost = self._lost(store.multi_get(keys), seen, moved)
                    if lost:
                        message = self._lost_message(lost)
                        store.set(_KEY + "lost", message)
                        readers = world_size - 1 - len(lost)
                        self._report(message, exit_after=lambda: self._await_readers(store, readers))  # noqa: B023
                elif store.check([_KEY + "lost"]):
                    # Said first, then acknowledged: rank 0 exits once all have read it, and srun ends the rest.
                    self._report(store.get(_KEY + "lost").decode(), exit_after=lambda: store.add(_KEY + "read", 1))
                self._last_answer = time.monotonic()
            store.set(keys[self.rank], str(_LEFT))
        except (RuntimeError, OSError):
            # The store's connection closed or refused: rank 0's process is gone and its host still answers. Not a
            # lost node: collectives report the crashed peer, or the job is ending. Silence is the judge's.
            self._stopping.set()

    def _lost(self, values: Sequence[bytes], seen: list[int], moved: list[float]) -> list[int]:
        """Rank 0: the ranks whose counters have not moved for ``timeout`` seconds (and did not end normally), with
        those that have missed a beat by then too (the rest of a dead node: its ranks fall silent a beat apart)."""
        now = time.monotonic()
        for rank, value in enumerate(values):
            count = int(value)
            if count != seen[rank]:
                seen[rank], moved[rank] = count, now
        silent = {rank: now - moved[rank] for rank in range(1, len(values)) if seen[rank] != _LEFT}
        if not any(seconds > self.timeout for seconds in silent.values()):
            return []
        return [rank for rank, seconds in silent.items() if seconds > 2 * self._period]

    def _await_readers(self, store: torch.distributed.Store, readers: int) -> None:
        """Rank 0, having posted a loss: until ``readers`` ranks have read it (two beats at most)."""
        deadline = time.monotonic() + 2 * self._period + 1
        while time.monotonic() < deadline and store.add(_KEY + "read", 0) < readers:
            time.sleep(0.1)

    def _judge(self) -> None:
        while not self._stopping.wait(min(self._period, 1.0)):
            silent = time.monotonic() - self._last_answer
            if silent > self.timeout + 2 * self._period and not self._stopping.is_set():
                self._report(
                    f"lost contact with node {self.nodes[0]}, which holds the job's rendezvous store (rank 0): no "
                    f"answer for {silent:.0f} s (--peer-timeout {self.timeout:g}) during {self.phase}; it is down or "
                    f"cut off from node {self.nodes[self.rank]}; {self.after()}"
                )

    # ---- the loss --------------------------------------------------------------------------------------------

    def _lost_message(self, lost: list[int]) -> str:
        by_node: dict[str, list[int]] = {}
        for rank in lost:
            by_node.setdefault(self.nodes[rank], []).append(rank)
        names = "; ".join(f"node {node} ({distributed.describe_ranks(ranks)})" for node, ranks in by_node.items())
        return (
            f"lost {names}: no heartbeat for {self.timeout:g} s (--peer-timeout) during {self.phase}; down or cut off "
            f"from node {self.nodes[0]}; {self.after()}"
        )

    def _report(self, message: str, exit_after: Callable[[], None] = lambda: None) -> None:
        """One line, then exit (once ``exit_after`` returns): the main thread may be blocked in a collective for good,
        so nothing else would end the process."""
        if not self._reported.acquire(blocking=False):
            return  # the other thread is already at it
        self.write(f"lemo_ds: error: {message}")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            with contextlib.suppress(RuntimeError, OSError):  # the store may be gone by now
                exit_after()
            self.before_exit()
        finally:
            self._exit(EXIT_CODE)

    @staticmethod
    def _beat_key(rank: int) -> str:
        return f"{_KEY}beat/{rank}"


def _store_from_env() -> torch.distributed.Store:
    """A client connection of its own to the rendezvous store (env:// rendezvous: MASTER_ADDR, MASTER_PORT)."""
    return torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=_DEFAULT_STORE_TIMEOUT
    )


def node_names() -> list[str]:
    """Every rank's node name, in rank order (a collective)."""
    names: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(names, launch_env.node_name())
    return [str(name) for name in names]
