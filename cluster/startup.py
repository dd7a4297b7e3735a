"""A gang's start-up, stage by stage: placement -> process group -> weights -> warm-up -> ready.

The supervisor keeps one `GangStartup` per build: the stage (each change logged once and kept in
`history`), how many ranks are up, and the bytes the ranks have loaded of their totals, with the
rate. `snapshot()` freezes it into a plain value. A Serve replica cannot answer calls until its
constructor (the whole build) returns, so `maverick serve` does not ask the gang: it opens a small
named actor, the `StartupBoard`, before deploying, and every supervisor pushes its snapshot there on
each change (no board, e.g. under `serve run` or in tests: nothing is sent).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)

STAGES = ("placement", "process group", "weights", "warm-up", "ready")
BOARD_NAME, BOARD_NAMESPACE = "maverick-startup", "maverick"


@dataclass(frozen=True)
class StartupSnapshot:
    application: str
    gang: str  # the Serve deployment's name: gang-0, gang-1, ...
    stage: str
    history: tuple[str, ...]  # every stage entered, in order
    ranks_up: int
    num_ranks: int
    loaded_bytes: int
    total_bytes: int  # 0 until every rank has planned its reads
    bytes_per_s: float  # since the weights stage began
    seconds: float  # since the build began
    order: tuple[float, int]  # (build began, wall clock; change count): a later build or change is larger


class GangStartup:
    """Written by the build thread and the supervisor's event loop; read by either (hence the lock)."""

    def __init__(self, gang: str, num_ranks: int, application: str = "maverick",
                 publish: Callable[[StartupSnapshot], None] | None = None):
        self.gang, self.num_ranks, self.application = gang, num_ranks, application
        self.publish = publish
        self.history: list[str] = []
        self.ranks_up = 0
        self.rank_bytes: dict[int, tuple[int, int]] = {}  # rank -> (loaded, total)
        self._started, self._began_wall = time.monotonic(), time.time()
        self._weights_started: float | None = None
        self._weights_seconds: float | None = None  # frozen once the weights stage ends
        self.stage_seconds: dict[str, float] = {}  # each stage that ended: how long it took (a rebuild's breakdown)
        self._entered = self._started
        self._sequence = itertools.count()
        self._lock = threading.Lock()

    @property
    def stage(self) -> str | None:
        return self.history[-1] if self.history else None

    def enter(self, stage: str) -> None:
        """Move forward to `stage` (entering the current stage again does nothing)."""
        with self._lock:
            if stage == self.stage:
                return
            assert STAGES.index(stage) > (STAGES.index(self.stage) if self.stage else -1), (self.stage, stage)
            now = time.monotonic()
            if self.stage is not None:
                self.stage_seconds[self.stage] = now - self._entered
            self._entered = now
            if stage == "weights":
                self._weights_started = now
            elif self._weights_started is not None and self._weights_seconds is None:
                self._weights_seconds = now - self._weights_started
            self.history.append(stage)
        log.info("%s: %s (%.1fs since start)", self.gang, stage, now - self._started)
        self._publish()

    def set_ranks_up(self, count: int) -> None:
        with self._lock:
            changed, self.ranks_up = count != self.ranks_up, count
        if changed:
            self._publish()

    def set_rank_bytes(self, reports: list[dict]) -> None:
        """The ranks' `load_progress()` answers."""
        with self._lock:
            before = dict(self.rank_bytes)
            for r in reports:
                self.rank_bytes[r["rank"]] = (r["loaded_bytes"], r["total_bytes"])
            changed = before != self.rank_bytes
        if changed:
            self._publish()

    def snapshot(self) -> StartupSnapshot:
        with self._lock:
            now = time.monotonic()
            loaded = sum(done for done, _ in self.rank_bytes.values())
            # a rank that has not planned yet reports 0 of 0: the total is known once all have
            planned = len(self.rank_bytes) == self.num_ranks and all(t for _, t in self.rank_bytes.values())
            total = sum(t for _, t in self.rank_bytes.values()) if planned else 0
            if self._weights_started is None:
                seconds = 0.0
            else:
                seconds = self._weights_seconds if self._weights_seconds is not None else now - self._weights_started
            rate = loaded / seconds if seconds > 0 else 0.0
            return StartupSnapshot(self.application, self.gang, self.stage or STAGES[0], tuple(self.history),
                                   self.ranks_up, self.num_ranks, loaded, total, rate, now - self._started,
                                   (self._began_wall, next(self._sequence)))

    def _publish(self) -> None:
        if self.publish is not None:
            self.publish(self.snapshot())


class StartupBoard:
    """Every gang's start-up as pushed by its supervisor, read by `maverick serve`: per gang, the latest
    snapshot of each stage it entered, so a stage shorter than the reader's poll is still seen."""

    def __init__(self):
        self._stages: dict[tuple[str, str], dict[str, StartupSnapshot]] = {}

    def publish(self, snapshot: StartupSnapshot) -> None:
        stages = self._stages.setdefault((snapshot.application, snapshot.gang), {})
        build = max((s.order[0] for s in stages.values()), default=snapshot.order[0])
        if snapshot.order[0] < build:  # a late push from a build that has been replaced
            return
        if snapshot.order[0] > build:  # the gang is being built again: start over
            stages.clear()
        old = stages.get(snapshot.stage)
        if old is None or snapshot.order > old.order:  # pushes from two threads may cross
            stages[snapshot.stage] = snapshot

    def snapshots(self) -> list[list[StartupSnapshot]]:
        """Per gang (sorted by application and name), its stages' latest snapshots in order: the last is
        where it is now."""
        return [sorted(self._stages[key].values(), key=lambda s: s.order) for key in sorted(self._stages)]


def open_board():
    """The board (created if missing), owned by the caller: it goes away with `maverick serve`."""
    board = ray.remote(StartupBoard).options(name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True,
                                             num_cpus=0)
    return board.remote()


class BoardPublisher:
    """A `GangStartup.publish` that pushes to the board if one is open (looked up on first use)."""

    def __init__(self):
        self._board = None
        self._looked_up = False

    def __call__(self, snapshot: StartupSnapshot) -> None:
        if not self._looked_up:
            self._looked_up = True
            try:
                self._board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
            except ValueError:  # nobody watches
                self._board = None
        if self._board is not None:
            try:
                self._board.publish.remote(snapshot)  # fire and forget: progress never delays the build
            except Exception as exc:  # the watcher went away: stop sending
                log.info("start-up board gone: %s", exc)
                self._board = None
