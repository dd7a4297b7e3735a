"""When a running gang changes its attention side: the policy, and the load it reads.

An attention rank holds the dense weights and the KV cache; the expert ranks hold the experts. When
the attention ranks run out of KV cache or queue requests while the expert ranks have time to spare,
one more attention rank is far cheaper than another gang (`GangSupervisor.add_attention_rank`);
when the load would fit in one rank fewer, the last one leaves (`remove_attention_rank`). The
supervisor reads its ranks' load (`load_report`) every `period_s` into an `AttentionLoad`; the policy
acts on a condition only once it held for `window_s`, and not within `cooldown_s` of the last change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from cluster.config import AttentionScalingConfig
from cluster.gang import ResizeRefused

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionLoad:
    ranks: int  # attention ranks serving
    kv_use: float  # mean over them of each one's fullest KV group's used fraction
    waiting: int  # requests waiting in their engines, all together
    running: int
    expert_busy: float  # the busiest expert rank's computing share of the time since the last reading

    def describe(self) -> str:
        return (f"KV {self.kv_use:.0%} over {self.ranks} attention rank(s), {self.running} running, "
                f"{self.waiting} waiting, busiest expert rank computing {self.expert_busy:.0%} of the time")


@dataclass(frozen=True)
class Decision:
    direction: str  # up | down
    reason: str  # kv | queue (up), idle (down)
    load: AttentionLoad

    def describe(self) -> str:
        return f"attention scaling {self.direction} ({self.reason}): {self.load.describe()}"


def attention_load(attention_stats: list[dict], expert_compute_s: list[float], elapsed_s: float) -> AttentionLoad:
    """The load from the attention ranks' `load_report()` and the expert ranks' compute seconds over the
    last `elapsed_s` seconds."""
    def fullest(kv: dict) -> float:
        return max((used / kv["blocks_total"][group] for group, used in kv["blocks_used"].items()
                    if kv["blocks_total"][group]), default=0.0)

    uses = [fullest(s["kv"]) for s in attention_stats]
    busy = max((c / elapsed_s for c in expert_compute_s), default=0.0) if elapsed_s > 0 else 0.0
    return AttentionLoad(ranks=len(attention_stats), kv_use=sum(uses) / max(len(uses), 1),
                         waiting=sum(s["waiting"] for s in attention_stats),
                         running=sum(s["running"] for s in attention_stats), expert_busy=busy)


class AttentionScalingPolicy:
    def __init__(self, settings: AttentionScalingConfig):
        self.settings = settings
        self._wanted: tuple[str, str] | None = None  # what the load asks for, and since when
        self._since = 0.0
        self._changed_at: float | None = None

    def want(self, load: AttentionLoad) -> tuple[str, str] | None:
        """What this reading alone asks for: (direction, reason), or None."""
        s = self.settings
        if load.ranks < s.max_attention_workers and load.expert_busy < s.expert_busy_max:
            if load.kv_use >= s.kv_high:
                return "up", "kv"
            if load.waiting >= s.waiting_high * load.ranks:
                return "up", "queue"
        if load.ranks > s.min_attention_workers and not load.waiting:
            if load.kv_use * load.ranks / (load.ranks - 1) < s.kv_low:
                return "down", "idle"
        return None

    def observe(self, now: float, load: AttentionLoad) -> Decision | None:
        """A decision once the same want held for `window_s`, outside the cooldown; else None."""
        wanted = self.want(load)
        if wanted != self._wanted:
            self._wanted, self._since = wanted, now
        s = self.settings
        if wanted is None or now - self._since < s.window_s:
            return None
        if self._changed_at is not None and now - self._changed_at < s.cooldown_s:
            return None
        return Decision(*wanted, load)

    def changed(self, now: float) -> None:
        """The gang acted (or tried to): the window starts again, the cooldown runs from now."""
        self._changed_at, self._wanted = now, None


class AttentionScaler:
    """The loop a gang supervisor runs with `attention_scaling` set: every `period_s` its ranks' load into
    the policy; a decision adds or removes an attention rank, is logged with its figures and counted
    (`maverick_attention_scaling_events`)."""

    def __init__(self, supervisor):
        self.supervisor = supervisor  # a `cluster.supervisor.GangSupervisor`
        self.settings: AttentionScalingConfig = supervisor.config.attention_scaling
        self.policy = AttentionScalingPolicy(self.settings)
        self.events: dict[str, int] = {}  # "direction/reason" -> changes done
        self._counter = None  # the Ray counter of those, made on the first

    async def run(self) -> None:
        sup, last = self.supervisor, None  # last: (when, each expert rank's compute seconds then)
        while sup.state != "stopped":
            await asyncio.sleep(self.settings.period_s)
            reading = await self._read(last)
            if reading is None:
                last = None
                continue
            last, load = reading
            if load is None:
                continue
            decision = self.policy.observe(last[0], load)
            if decision is not None:
                await self._act(decision)
                last = None  # the next window reads the new set of ranks

    async def _read(self, last: tuple[float, list[float]] | None):
        """(now, compute seconds) and the load since `last` (None on a first reading); None when the gang
        is not serving or a rank did not answer (the health check handles that)."""
        sup = self.supervisor
        gang = sup.gang
        if sup.state != "ready" or sup.draining or gang is None:
            return None
        try:
            attention = await asyncio.gather(*(a.load_report.remote() for a in sup.serving_attention()))
            compute = list(await asyncio.gather(*(e.compute_seconds_total.remote() for e in gang.experts)))
        except Exception:
            return None
        now = time.monotonic()
        if last is None or len(last[1]) != len(compute):
            return (now, compute), None
        spent = [c - b for c, b in zip(compute, last[1])]
        return (now, compute), attention_load(attention, spent, now - last[0])

    async def _act(self, decision: Decision) -> None:
        sup = self.supervisor
        log.warning("gang %s: %s", sup.name, decision.describe())  # a warning: the replica's log keeps it
        self.policy.changed(time.monotonic())
        try:
            if decision.direction == "up":
                await sup.add_attention_rank()
            else:
                await sup.remove_attention_rank(self.settings.drain_grace_s)
        except ResizeRefused as exc:
            log.warning("gang %s: attention scaling %s refused: %s", sup.name, decision.direction, exc)
            return
        except Exception as exc:  # the gang failed over it and recovers
            log.error("gang %s: attention scaling %s failed: %s", sup.name, decision.direction, exc)
            return
        self.policy.changed(time.monotonic())  # the cooldown runs from the end of the change
        self._count(decision)

    def _count(self, decision: Decision) -> None:
        key = f"{decision.direction}/{decision.reason}"
        self.events[key] = self.events.get(key, 0) + 1
        try:
            if self._counter is None:
                from ray.util.metrics import Counter

                self._counter = Counter(
                    "maverick_attention_scaling_events", "Attention ranks added to (up) or removed from (down) a "
                    "running gang, by reason (kv, queue, idle).",
                    tag_keys=("application", "gang", "direction", "reason"))
            sup = self.supervisor
            self._counter.inc(1, {"application": sup.application, "gang": sup.name, "direction": decision.direction,
                                  "reason": decision.reason})
        except Exception:  # metrics are best effort
            log.exception("could not count the attention scaling event")
