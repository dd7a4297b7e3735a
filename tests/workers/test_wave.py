"""The wave loop's one all-reduce per round: every rank plans, the gang agrees capacity and micro-batch
count by MAX, steps together while any rank has tokens, and goes idle together; local work wakes it."""

import datetime
import socket
import threading

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
        self.changed = threading.Condition()
        self.wave = WaveLoop(group, idle_steps=2, plan=self._plan, step=self._step, name=f"test-{index}")

    def _plan(self) -> list[int]:
        with self.changed:
            return self.script.pop(0) if self.script else [0, 0]

    def _step(self, agreed: list[int]) -> None:
        with self.changed:
            self.agreed.append(agreed)
            self.changed.notify_all()

    def give(self, proposals: list[list[int]], wake: bool = True) -> None:
        with self.changed:
            self.script += proposals
        if wake:
            self.wave.wake_local()

    def wait_rounds(self, n: int) -> list[list[int]]:
        """The agreements of the first `n` rounds, once this rank has run them."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.agreed) >= n or self.wave.failed, TIMEOUT), self.agreed
            assert self.wave.failed is None, self.wave.failed
            return self.agreed[:n]


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
    idle = [[0, 0]] * 2  # rounds without tokens are no steps; after `idle_steps` (2) of them a rank sleeps
    try:
        for rank in ranks:
            assert rank.wait_rounds(2) == idle
        ranks[1].give([[3, 2], [4, 1]], wake=False)  # queued while asleep; rank 0's work wakes the gang
        ranks[0].give([[5, 1], [0, 0], [7, 2]])
        # one plan per rank per round, agreed by MAX: [5,1]|[3,2], [0,0]|[4,1], [7,2]|[0,0]
        first = idle + [[5, 2], [4, 1], [7, 2]] + idle
        for rank in ranks:
            assert rank.wait_rounds(len(first)) == first
        # local work on the rank without plans of its own wakes the whole gang; a rank that had not
        # gone to sleep would show more empty rounds between the two waves
        ranks[2].give([[1, 1]])
        for rank in ranks:
            assert rank.wait_rounds(len(first) + 3) == first + [[1, 1]] + idle
        assert all(rank.wave.num_steps == 4 for rank in ranks)
    finally:
        for rank in ranks:
            rank.wave.stop()
