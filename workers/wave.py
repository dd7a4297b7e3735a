"""The wave loop every rank of a gang runs on its own thread.

All ranks step together. Each rank first plans its next step (`plan`: an attention rank takes its
inbox and schedules a batch) and proposes numbers the gang agrees by MAX: the capacity T (the most
routed rows of any micro-batch) and the micro-batch count M. One tiny all-reduce (MAX) of
[-wake generation, T, M] is the step's only collective outside the MoE layers. If T > 0 some rank
has tokens and every rank runs the step with the agreed T and M (attention ranks with zero tokens
if they have none, so the MoE collectives line up); after `idle_steps` steps without tokens all
ranks go idle together and wait on an event, never inside a collective.

Waking: a request (or an abort) arrives at one attention worker, which calls `wake_local()`. At the
idle decision each rank contributed its generation (read, and the local flag cleared, before it
planned) and sleeps until its own generation exceeds the smallest contributed one, L. A rank woken
by local work sets its generation to L + 1 and sends `wake(L + 1)` to every peer (`wake_peers`): all
ranks then agree again. So a request that arrived just after a rank planned is never left asleep,
work a plan took always runs (its rank proposes T > 0, so the gang steps), and only an idle gang
costs messages: a busy one sees the new work at its next step's all-reduce.

Parking: the gang changes its process group (attention ranks join or leave) at a step boundary
that every rank agrees on. `park()` on any rank puts a 1 in the all-reduce's last field; every rank
runs that round's step and then ends its loop, cleanly, its engine and weights untouched: the
regrouped gang continues on a new loop from where this one stopped.

The step watchdog: each round is stamped when it begins (`round_started`) and timed when it ends. A
rank whose round has lasted past `stall_deadline_s()` (a multiple of the recent p99 round, with a
floor above scheduling noise) is waiting on a peer that has not met it: `Rank.wait_stall` reports
that, and the supervisor asks every rank which one stopped answering (`GangSupervisor._watch_steps`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# a stall only makes the supervisor ask every rank (a rank busy with a long prefill still answers), so
# the deadline may be tight: the floor sits above a loaded machine's scheduling noise (a false stall
# costs one round of questions, never a rank)
STALL_FLOOR_S = 0.5
STALL_FACTOR = 5.0  # times the recent p99 round
DEADLINE_EVERY_ROUNDS = 8  # the deadline follows the rounds' times this often (a sort of 256 floats)


class WaveLoop:
    def __init__(self, group: dist.ProcessGroup | None, idle_steps: int, plan: Callable[[], list[int]],
                 step: Callable[[list[int]], None], name: str, torch_threads: int = 1,
                 device: torch.device | str = "cpu"):
        self.group = group
        self.torch_threads = torch_threads
        self.idle_steps = idle_steps
        self.plan = plan  # -> this rank's proposal [T, M] for its next step (T = 0: no tokens here)
        self.step = step  # (the gang's agreed [T, M]) -> None; runs every round, computes when T > 0
        self.device = torch.device(device)  # where the agreement's tensor lives (NCCL: the GPU)
        self.name = name
        self._cond = threading.Condition()
        self._wake_gen = 0
        self._stop = False
        self.failed: BaseException | None = None
        self.num_steps = 0
        self.idle = False
        self.idle_seconds = 0.0  # asleep between waves, since start (a metric: idle fraction)
        self.on_failure: Callable[[BaseException], None] | None = None
        self.wake_peers: Callable[[int], None] | None = None  # send wake(generation) to every other rank
        self._local_wake = False
        self._park = False  # asked to park: said in the next agreement
        self.parked = False  # this loop ended at a parking round agreed by the whole gang
        self.round_started: float | None = None  # monotonic start of the round under way; None between rounds
        self.rounds = 0
        self.round_seconds: deque[float] = deque(maxlen=256)  # the recent rounds' durations (the watchdog's)
        self._deadline_s = STALL_FLOOR_S  # recomputed on this loop's thread, read by the watchdog's
        self._thread = threading.Thread(target=self._run, name=f"wave-{name}", daemon=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def wake(self, generation: int) -> None:
        with self._cond:
            self._wake_gen = max(self._wake_gen, generation)
            self._cond.notify_all()

    def wake_local(self) -> None:
        """Work arrived at this rank (a request, an abort)."""
        with self._cond:
            self._local_wake = True
            self._cond.notify_all()

    def park(self) -> None:
        """End the loop after the next round the gang agrees on (every rank ends after the same one)."""
        with self._cond:
            self._park = True
            self._local_wake = True  # an idle gang wakes to agree
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def stall_deadline_s(self) -> float:
        """How long a round may last before this rank counts as waiting on a silent peer."""
        return self._deadline_s

    def _time_round(self, seconds: float) -> None:  # on the loop's thread: the only writer of the rounds
        self.round_seconds.append(seconds)
        self.round_started, self.rounds = None, self.rounds + 1
        if self.rounds % DEADLINE_EVERY_ROUNDS == 1:
            times = sorted(self.round_seconds)
            self._deadline_s = max(STALL_FLOOR_S, STALL_FACTOR * times[int(0.99 * (len(times) - 1))])

    def stalled(self) -> tuple[int, float] | None:
        """(round, seconds in it) when the round under way has passed its deadline, else None."""
        started, round_no = self.round_started, self.rounds
        if started is None or self.failed is not None:
            return None
        in_round = time.monotonic() - started
        return (round_no, in_round) if in_round >= self.stall_deadline_s() else None

    def _run(self) -> None:
        torch.set_num_threads(self.torch_threads)  # this thread computes every step (see `Rank`)
        empty = 0
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                    gen = self._wake_gen  # NOTE: read before this rank plans (see module doc)
                    self._local_wake = False  # work queued before now is in this plan
                    park = int(self._park)
                self.round_started = started = time.monotonic()
                agreed, lowest = self.plan(), gen  # a lone rank (no expert workers) agrees with itself
                if self.group is not None:
                    flags = torch.tensor([-gen, *agreed, park], dtype=torch.long, device=self.device)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
                    minus_lowest, *agreed, park = flags.tolist()  # NOTE: the one host read of a step
                    lowest = -minus_lowest
                self.step(agreed)
                self._time_round(time.monotonic() - started)
                if agreed[0] > 0:
                    empty = 0
                    self.num_steps += 1
                if park:
                    self.parked = True
                    log.info("wave loop %s parked after %d steps", self.name, self.num_steps)
                    return
                if agreed[0] > 0:
                    continue
                empty += 1
                if empty < self.idle_steps:
                    continue
                empty = 0
                with self._cond:
                    self.idle, asleep = True, time.monotonic()
                    self._cond.wait_for(lambda: self._wake_gen > lowest or self._local_wake or self._stop)
                    self.idle, self.idle_seconds = False, self.idle_seconds + time.monotonic() - asleep
                    woken_here = self._local_wake and self._wake_gen <= lowest
                    self._wake_gen = max(self._wake_gen, lowest + 1)
                if woken_here and self.wake_peers is not None:
                    self.wake_peers(lowest + 1)
        except BaseException as exc:  # a dead peer or a collective timeout: the gang has failed
            log.error("wave loop %s failed: %s", self.name, exc)
            self.failed = exc
            if self.on_failure is not None:
                self.on_failure(exc)
