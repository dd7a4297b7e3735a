"""The wave loop's one all-reduce per round: every rank plans, the gang agrees capacity and micro-batch
count by MAX, steps together while any rank has tokens, and goes idle together; local work wakes it."""

import datetime
import socket
import threading
import time

from workers.rank import gloo_group
from workers.wave import WaveLoop

TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Rank:
    """A rank whose plans come from a script: one [T, M] proposal per round while it lasts."""

    def __init__(self, index: int, group):
        self.script: list[list[int]] = []
        self.agreed: list[list[int]] = []
        self.lock = threading.Lock()
        self.wave = WaveLoop(group, idle_steps=2, plan=self._plan, step=self._step, name=f"test-{index}")

    def _plan(self) -> list[int]:
        with self.lock:
            return self.script.pop(0) if self.script else [0, 0]

    def _step(self, agreed: list[int]) -> None:
        with self.lock:
            self.agreed.append(agreed)

    def give(self, proposals: list[list[int]], wake: bool = True) -> None:
        with self.lock:
            self.script += proposals
        if wake:
            self.wave.wake_local()

    def wait_idle(self, steps: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not (self.wave.idle and self.wave.num_steps == steps):
            assert time.monotonic() < deadline and self.wave.failed is None, (self.wave.num_steps, self.wave.failed)
            time.sleep(0.01)

    def steps(self) -> list[list[int]]:
        with self.lock:
            return [a for a in self.agreed if a[0] > 0]


def _gang(size: int) -> list[_Rank]:
    port, groups = _free_port(), [None] * size
    timeout = datetime.timedelta(seconds=TIMEOUT)

    def join(rank):
        groups[rank] = gloo_group("127.0.0.1", port, rank, size, timeout)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    ranks = [_Rank(i, group) for i, (group, _) in enumerate(groups)]
    ranks[0].stores = [store for _, store in groups]  # the rendezvous stores live as long as the gang
    for rank in ranks:
        rank.wave.wake_peers = lambda gen, me=rank: [r.wave.wake(gen) for r in ranks if r is not me]
        rank.wave.start()
    return ranks


def test_ranks_agree_by_max_step_together_and_idle_together():
    ranks = _gang(3)  # two ranks with plans (attention-like), one that only proposes [0, 0] (expert-like)
    try:
        for rank in ranks:
            rank.wait_idle(0)
        ranks[1].give([[3, 2], [4, 1]], wake=False)  # queued while idle; rank 0's work wakes the gang
        ranks[0].give([[5, 1], [0, 0], [7, 2]])
        for rank in ranks:
            rank.wait_idle(3)
        # one plan per rank per round, agreed by MAX: [5,1]|[3,2], [0,0]|[4,1], [7,2]|[0,0]
        assert [rank.steps() for rank in ranks] == [[[5, 2], [4, 1], [7, 2]]] * 3
        # rounds without tokens are not steps; after `idle_steps` (2) of them every rank sleeps
        idle = [[0, 0]] * 2
        assert all(rank.agreed == idle + [[5, 2], [4, 1], [7, 2]] + idle for rank in ranks)
        # local work on the rank without plans of its own wakes the whole idle gang
        ranks[2].give([[1, 1]])
        for rank in ranks:
            rank.wait_idle(4)
        assert all(rank.steps()[-1] == [1, 1] for rank in ranks)
    finally:
        for rank in ranks:
            rank.wave.stop()
