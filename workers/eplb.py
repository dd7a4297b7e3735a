"""Live expert rebalancing (EPLB) on one rank of a gang: measure, agree, stage, switch.

Every rank of the gang, attention and expert alike, runs the same `Rebalancer` on its wave thread:
  1. measure: expert ranks count the rows each (MoE layer, expert) received (`load`); attention ranks
     count nothing;
  2. agree: every `rebalance_every_steps` steps with work, one all-reduce (SUM) of the last
     `window_steps` steps' counts, after the step's MoE collectives; every rank then runs the pure
     policy (`workers.expert_placement`) on the same numbers, so nothing else is sent;
  3. stage: an expert rank whose slots changed loads the experts it will hold, beside the ones it
     serves, on a thread of its own (`stage`), while the gang keeps stepping on the old table;
  4. switch: each rank votes STAGING in the wave's all-reduce (MAX) until it has staged; the first
     round whose agreed vote is READY switches every rank at once, before that round's forward (a
     rank that failed to stage votes FAILED, and every rank drops the rebalance at once).
Outputs do not depend on placement (`replica_of_rows`), so requests never notice a rebalance.

Shape suffixes: L MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from workers.config import EplbSettings
from workers.expert_parallel import Placement
from workers.expert_placement import (CostModel, LayerPlacement, Replica, balancedness, place_experts, rank_costs,
                                     to_rank_table)

log = logging.getLogger(__name__)

READY, STAGING, FAILED = 0, 1, 2  # votes, agreed by MAX
KEPT_SWITCHES = 16
# stage(new placements) -> install(): loads off the wave thread, then swaps on it; returns bytes read
Stage = Callable[[dict[int, LayerPlacement]], tuple[Callable[[], None], int]]


@dataclass
class RebalanceStats:
    """What a rank tells `stats()` and metrics; replaced whole, never mutated (other threads read it)."""
    rebalances: int = 0  # switches done
    staging: bool = False  # a rebalance is decided and not yet switched to (or dropped)
    unchanged: int = 0  # rebalances whose policy kept the placement
    seconds_total: float = 0.0  # decision to switch, summed
    bytes_total: int = 0  # expert bytes this rank loaded for rebalances
    install_seconds_total: float = 0.0  # spent at switch steps putting staged experts in (not overlapped)
    balancedness: dict[int, float] = field(default_factory=dict)  # layer -> the last window, as it was served
    planned: dict[int, float] = field(default_factory=dict)  # layer -> the same window under the new table
    # (decision, switch) of the first rebalances, in this epoch's steps with work: staging ran in between
    switches: tuple[tuple[int, int], ...] = ()


@dataclass
class _Pending:
    table: dict[int, list[list[int]]]
    placements: dict[int, LayerPlacement]
    decided: float
    step: int  # steps with work done when it was decided
    install: Callable[[], None] | None = None
    nbytes: int = 0
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class Rebalancer:
    def __init__(self, settings: EplbSettings, placement: Placement, moe_layers: list[int], num_experts: int,
                 capacities: list[int], group: dist.ProcessGroup | None,
                 device: torch.device, load: Callable[[], torch.Tensor] | None = None, stage: Stage | None = None,
                 staged: Callable[[], None] | None = None):
        self.settings, self.placement = settings, placement
        self.moe_layers, self.capacities = moe_layers, capacities
        self.group, self.device = group, device
        # rows per (layer, expert) received by this rank since start; attention ranks receive none
        self.load = load or (lambda: torch.zeros(len(moe_layers), num_experts, dtype=torch.long, device=device))
        self.stage, self.staged = stage, staged  # staged: called once this rank can vote READY or FAILED
        self.steps = 0
        self._window_start = self.load().clone()
        self._pending: _Pending | None = None
        self.stats = RebalanceStats()

    @property
    def active(self) -> bool:
        return self.settings.rebalance_every_steps > 0

    def vote(self) -> int:
        """This rank's word in the wave's all-reduce (MAX): READY, STAGING a decided rebalance, or FAILED
        to stage it (then every rank drops it together and keeps the table it has)."""
        pending = self._pending
        if pending is None or not pending.ready.is_set():
            return STAGING if pending is not None else READY
        return FAILED if pending.error is not None else READY

    def before_step(self, agreed: int) -> None:
        """First thing of every round, with the gang's agreed vote: switch when every rank has staged."""
        pending = self._pending
        if pending is None or agreed == STAGING:
            return
        self._pending = None
        self.stats = dataclasses.replace(self.stats, staging=False)
        if agreed == FAILED:
            log.error("a rank could not stage the rebalance decided at step %d: the placement stays", self.steps)
            return
        installing = time.perf_counter()
        if pending.install is not None:
            pending.install()
        self.placement.update(pending.table)
        installed = time.perf_counter() - installing
        s = self.stats
        self.stats = dataclasses.replace(s, rebalances=s.rebalances + 1, bytes_total=s.bytes_total + pending.nbytes,
                                         install_seconds_total=s.install_seconds_total + installed,
                                         seconds_total=s.seconds_total + time.monotonic() - pending.decided,
                                         switches=(s.switches + ((pending.step, self.steps),))[:KEPT_SWITCHES])
        log.info("rebalanced experts at step %d in %.2fs (%d bytes loaded here); balancedness by layer %s -> %s",
                 self.steps, time.monotonic() - pending.decided, pending.nbytes, _fmt(s.balancedness), _fmt(s.planned))

    def after_step(self) -> None:
        """After every step with work, once its MoE collectives are done (the same point on every rank)."""
        self.steps += 1
        every = self.settings.rebalance_every_steps
        if not every:
            return
        window = self.settings.window_steps or every
        phase = self.steps % every
        if phase == 0 and self._pending is None:
            self._decide(self.load() - self._window_start)
        if phase == (every - window) % every:
            self._window_start = self.load().clone()

    def _decide(self, window_LE: torch.Tensor) -> None:
        if self.group is not None:
            dist.all_reduce(window_LE, op=dist.ReduceOp.SUM, group=self.group)
        load = {layer: row for layer, row in zip(self.moe_layers, window_LE.tolist())}
        settings = self.settings
        cost = CostModel(settings.weight_read_rows, settings.window_steps or settings.rebalance_every_steps)
        placements = place_experts(load, self.capacities, cost)
        table = to_rank_table(placements)
        current = {layer: _as_placement(self.placement.table[layer], len(self.capacities)) for layer in load}
        before = {layer: balancedness(current[layer].rank_tokens(row)) for layer, row in load.items()}
        planned = {layer: balancedness(placements[layer].rank_tokens(row)) for layer, row in load.items()}
        s = self.stats
        if cost.weight_rows:  # what the policy lowered: the busiest rank's modelled cost, not rows
            gain = _mean_busiest_drop(current, placements, load, cost)
        else:
            gain = sum(planned.values()) / len(planned) - sum(before.values()) / len(before)
        if table == self.placement.table or gain < self.settings.min_gain:
            self.stats = dataclasses.replace(s, unchanged=s.unchanged + 1, balancedness=before, planned=planned)
            return
        self.stats = dataclasses.replace(s, balancedness=before, planned=planned, staging=True)
        pending = self._pending = _Pending(table, placements, time.monotonic(), self.steps)
        if self.stage is None:  # an attention rank swaps its table only
            pending.ready.set()
            return
        threading.Thread(target=self._stage, args=(pending,), name="eplb-stage", daemon=True).start()

    def _stage(self, pending: _Pending) -> None:
        torch.set_num_threads(1)  # never fork the OpenMP team off the wave thread (see `workers.rank`)
        try:
            pending.install, pending.nbytes = self.stage(pending.placements)
        except Exception as exc:  # voted FAILED: the gang keeps its table
            log.exception("staging a rebalance failed")
            pending.error = exc
        pending.ready.set()
        if self.staged is not None:  # a gang that went idle meanwhile must still agree to switch
            self.staged()


def _as_placement(ranks_E: list[list[int]], num_ranks: int) -> LayerPlacement:
    """A rank table's layer as a `LayerPlacement` (slot numbers made up: only ranks matter here)."""
    slots: list[list[int]] = [[] for _ in range(num_ranks)]
    for e, ranks in enumerate(ranks_E):
        for rank in ranks:
            slots[rank].append(e)
    replicas = tuple(tuple(Replica(rank, slots[rank].index(e)) for rank in ranks) for e, ranks in enumerate(ranks_E))
    return LayerPlacement(replicas, tuple(map(tuple, slots)))


def _mean_busiest_drop(old: dict[int, LayerPlacement], new: dict[int, LayerPlacement], load: dict[int, list[int]],
                       cost: CostModel) -> float:
    """How much lower the busiest rank's modelled cost is under `new`, as a fraction, averaged over layers."""
    drops = []
    for layer, row in load.items():
        before = max(rank_costs(old[layer], row, cost))
        drops.append(0.0 if before == 0 else 1 - max(rank_costs(new[layer], row, cost)) / before)
    return sum(drops) / len(drops)


def _fmt(by_layer: dict[int, float]) -> str:
    return "{" + ", ".join(f"{layer}: {b:.2f}" for layer, b in by_layer.items()) + "}"
