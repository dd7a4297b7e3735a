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
        self.index = index
        self.regroup(group)

    def regroup(self, group) -> None:
        """A new loop on `group`, with this rank's script and agreements so far (a regrouped gang's rank)."""
        self.wave = WaveLoop(group, idle_steps=2, plan=self._plan, step=self._step, name=f"test-{self.index}")

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


def _groups(size: int) -> list:
    port, groups = _free_port(), [None] * size
    timeout = datetime.timedelta(seconds=TIMEOUT)

    def join(rank):
        groups[rank] = gloo_group("127.0.0.1", port, rank, size, timeout)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    return groups


def _start(ranks: list[_Rank], groups: list) -> None:
    ranks[0].stores = [store for _, store in groups]  # the rendezvous stores live as long as the gang
    for rank in ranks:
        rank.wave.wake_peers = lambda gen, me=rank: [r.wave.wake(gen) for r in ranks if r is not me]
        rank.wave.start()


def _gang(size: int) -> list[_Rank]:
    groups = _groups(size)
    ranks = [_Rank(i, group) for i, (group, _) in enumerate(groups)]
    _start(ranks, groups)
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


def test_a_parked_gang_ends_after_one_agreed_round_and_goes_on_in_a_bigger_group():
    """Parking, asked by one rank mid-wave, ends every rank's loop after the same round, none failed;
    a fourth rank then joins a new group and the old ranks' work goes on where it stopped."""
    ranks = _gang(3)
    try:
        for rank in ranks:
            rank.wait_rounds(2)  # idle
        ranks[0].give([[2, 1]] * 40)
        ranks[0].wait_rounds(2 + 5)
        ranks[2].wave.park()  # a rank without work of its own asks
        for rank in ranks:
            rank.wave.thread.join(TIMEOUT)
            assert rank.wave.parked and rank.wave.failed is None and not rank.wave.thread.is_alive()
        rounds = {len(rank.agreed) for rank in ranks}
        assert len(rounds) == 1, rounds  # the same last round everywhere
        left = len(ranks[0].script)
        assert 0 < left < 40 - 5
        groups = _groups(4)
        ranks.append(_Rank(3, None))
        ranks[3].agreed = list(ranks[0].agreed)  # the newcomer's own record starts with the gang's
        for rank, (group, _) in zip(ranks, groups):
            rank.regroup(group)
        _start(ranks, groups)
        done = rounds.pop() + left + 2
        agreed = [rank.wait_rounds(done) for rank in ranks]
        assert all(a == agreed[0] for a in agreed)
        assert agreed[0][-left - 2:] == [[2, 1]] * left + [[0, 0]] * 2  # the rest of the work, then idle
        # an idle gang parks too: it wakes to agree
        for rank in ranks:
            rank.wave.park()
        for rank in ranks:
            rank.wave.thread.join(TIMEOUT)
            assert rank.wave.parked and rank.wave.failed is None
    finally:
        for rank in ranks:
            rank.wave.stop()
