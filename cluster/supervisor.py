"""The gang supervisor: builds the gang, watches it, rebuilds it; its own requests (the warm-up, the
in-process benchmark and tests) go through a `GangClient` like any consumer's.

Consumers (the ingress replicas) ask `attention()` for the gang's attention worker handles and its
epoch, and stream from those workers themselves: no request's tokens pass through this process. A
dead rank, a rank whose collective failed (its channels break), a hang or a failed health check marks
the gang failed: its requests' streams end with `Unavailable` (the ingress resumes them elsewhere,
`router.resume`), new ones are refused, and the gang is rebuilt under a new epoch.

The states, one transition table like `workers.request`'s:

    starting ──warm──> ready ──a rank fails──> failed ──torn down──> rebuilding ──warm──> ready
    any state ──stop()──> stopped (final: it wins over a rebuild under way)

Attention ranks join and leave the running gang without a new epoch (`add_attention_rank`,
`remove_attention_rank`): consumers see `attention_version` change and follow; only the requests on
a leaving rank move. One resize at a time; with `attention_scaling` set, a task reads the ranks' load
and resizes by its policy (`cluster.attention_scaling.AttentionScaler`).

Hangs are found from the step itself: every rank meets the others in each step, and a rank kept
waiting past a deadline derived from its recent rounds says so (`Rank.wait_stall`, a long-poll). The
supervisor then asks every rank at once; those that do not answer within `PROBE_S`, asked twice, are
hung (a rank busy with a long prefill still answers). The health check, every `health_period_s`, remains for a
gang with nothing to step.

Under Serve (`registry` given) the gang outlives this supervisor: its ranks are detached, every
change is written down (`cluster.gang_registry`), and a supervisor started after this one died takes
the same running gang over (`start` -> `_adopt`) instead of building one; a lease this supervisor
renews tells the ranks it still looks after them.

One owned task does a recovery: the ranks that survived keep their weights and rejoin a new process
group beside replacements for the dead or hung ones (`cluster.gang.recover_gang`); if that fails,
the gang is torn down and built anew until a build warms up. Every `await` in it is followed by a
check that the supervisor was not stopped meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

from cluster import routing
from cluster.attention_scaling import AttentionScaler
from cluster.config import GangConfig
from cluster.gang import (Gang, RankLease, ResizeRefused, build_gang, check_shrinkable, destroy_gang, grow_attention,
                          recover_gang, shrink_attention)
from cluster.gang_client import GangClient
from cluster.gang_pool import STATUS_PERIOD_S
from cluster.gang_registry import GangRecord, GangRegistry, clean_orphan
from cluster.spares import keep_spares
from cluster.startup import BoardPublisher, GangStartup
from workers.errors import Unavailable
from workers.expert_parallel import Placement
from workers.protocol import GenerateRequest, RequestOutput
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)

WATCH_POLL_S = 30.0  # each rank's stall long-poll returns empty this often (a call never outlives a gang long)
PROBE_S = 0.75  # after a stall report, a rank that does not answer within this, twice, is hung
BUILD_TIMEOUT_S = 300.0  # each stage of a build (`cluster.gang.build_gang`'s default)
ADOPT_ANSWER_S = 3.0  # a rank of an orphaned gang that does not answer within this is replaced

_ALLOWED = {
    "starting": {"ready", "stopped"},
    "ready": {"failed", "stopped"},
    "failed": {"rebuilding", "stopped"},
    "rebuilding": {"ready", "stopped"},
    "stopped": set(),
}


class Stopped(Exception):
    """The supervisor was stopped while it built a gang."""


class GangSupervisor:
    def __init__(self, config: GangConfig, health_period_s: float = 5.0, rebuild: bool = True,
                 pg=None, bundle_offset: int = 0, name: str = "gang", application: str = "maverick",
                 placement: Placement | None = None, registry: GangRegistry | None = None):
        self.config, self.name, self.application = config, name, application
        self.registry = registry  # under Serve: the gang outlives this supervisor (see the module doc)
        self.adoptions = 0  # gangs this supervisor took over from a dead one
        self.placement = placement  # None: experts split contiguously over the expert ranks
        self.pg, self.bundle_offset = pg, bundle_offset  # a Serve replica's placement group, if any
        self.health_period_s = health_period_s
        self.rebuild = rebuild
        self.gang: Gang | None = None
        self.startup: GangStartup | None = None  # this build's stages, bytes loaded, ranks up
        self.state = "starting"  # see _ALLOWED
        self.failure: str | None = None
        self.draining = False  # leaving (Serve stops its replica): takes no new request
        self.restarts = 0
        self.hangs_found = {"watchdog": 0, "health_check": 0}  # who declared each hang
        self.failed_at = 0.0
        self.last_recovery_s: float | None = None  # failure seen -> the rebuilt gang warm
        self.last_build_bytes = 0  # checkpoint bytes the last build read
        self.client: GangClient | None = None  # this supervisor's own requests
        self._monitor_task: asyncio.Task | None = None
        self._watchers: list[asyncio.Task] = []  # the step watchdog's long-polls, one per rank
        # starts the spares of `_spares_gang`; a recovery in place keeps that gang, so its task goes on
        self._spares_task: asyncio.Task | None = None
        self._spares_gang: Gang | None = None
        self._recovery: asyncio.Task | None = None  # the one task tearing down and rebuilding
        self._recovering: Gang | None = None  # the failed gang while `_recovery` keeps its survivors
        self._lease_task: asyncio.Task | None = None
        # bumped per build, so stale watchers of a dead gang stop; starts at the clock, so a replica that
        # Serve started anew after the old one died never repeats an epoch its consumers saw failing
        self.epoch = time.time_ns() // 1000
        self.attention_version = 0  # bumped when attention ranks join or leave the running gang
        self.leaving_ranks = 0  # attention ranks at the end that take no new request: they are leaving
        self._resizing = asyncio.Lock()
        self.scaler = AttentionScaler(self) if config.attention_scaling is not None else None
        self._scaling_task: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build and warm up the first gang, or take over one whose supervisor died (`registry`); raises
        if that fails (a Serve replica then fails to start)."""
        if self.registry is not None:
            self._lease_task = asyncio.create_task(self._keep_leases())
            record = await asyncio.to_thread(self.registry.claim_orphan)
            if record is not None and await self._adopt(record):
                return
        await self._build()
        self._now_ready()

    async def _adopt(self, record: GangRecord) -> bool:
        """The orphaned gang of `record` under this supervisor: as it runs when every rank answers (same
        epoch, same group: streams in flight go on), recovered in place when some do, else removed
        (False: build anew)."""
        gang, own_name = record.gang, self.name
        gang.on_change = self._save
        self.name, self.epoch = record.name, record.epoch
        self.attention_version, self.restarts = record.attention_version, record.restarts
        states = await self._states(gang.ranks, ADOPT_ANSWER_S)
        silent = {rank for rank, state in enumerate(states) if state is None}
        if not silent and not any(state["failed"] for state in states):
            self.gang, self.adoptions = gang, self.adoptions + 1
            self.client = self._dial(gang, self.epoch)
            self._now_ready()
            log.warning("gang %s: taken over at epoch %d, its %d ranks running on (their supervisor died)",
                        self.name, self.epoch, len(gang.ranks))
            return True
        if len(silent) < len(states):
            log.warning("gang %s: taken over failed (ranks %s silent): recovering it in place", self.name,
                        sorted(silent))
            self._recovering, self.failed_at = gang, time.monotonic()
            try:
                await self._build(gang, silent)
            except Stopped:
                raise
            except Exception as exc:
                log.error("gang %s: the orphan could not be recovered: %s", self.name, exc)
            else:
                self._recovering, self.restarts, self.adoptions = None, self.restarts + 1, self.adoptions + 1
                self._now_ready()
                return True
        await asyncio.to_thread(destroy_gang, gang)
        self.registry.forget(record.name)
        self._recovering, self.name = None, own_name
        return False

    @staticmethod
    async def _states(actors, timeout_s: float) -> list[dict | None]:
        """Each actor's `wave_state()`, None for one dead or silent for `timeout_s`."""
        calls = [asyncio.ensure_future(a.wave_state.remote()) for a in actors]
        if calls:
            await asyncio.wait(calls, timeout=timeout_s)
        states = [c.result() if c.done() and c.exception() is None else None for c in calls]
        for call in calls:
            call.cancel()
        return states

    def _lease(self) -> RankLease | None:
        if self.registry is None:
            return None
        grace = self.config.orphan_grace_s
        return RankLease(grace, BUILD_TIMEOUT_S + grace, functools.partial(clean_orphan, self.application, self.name))

    def _save(self, gang: Gang) -> None:
        """Write the gang down (`cluster.gang_registry`): called on every change, from any thread."""
        if self.registry is None or gang.destroyed or self.state == "stopped":
            return
        registry = self.registry
        registry.save(GangRecord(self.name, registry.owner, registry.fingerprint, gang, self.epoch,
                                 self.attention_version, self.restarts,
                                 ready=self.state == "ready" and self.gang is gang))

    async def _keep_leases(self) -> None:
        """Renew every rank's and spare's lease while this supervisor lives, whatever its state."""
        period = min(5.0, self.config.orphan_grace_s / 4)
        while self.state != "stopped":
            await asyncio.sleep(period)
            gang = self.gang or self._recovering
            if gang is None:
                continue
            actors = gang.ranks + [spare.actor for spare in gang.spares]
            calls = [asyncio.ensure_future(a.renew_lease.remote()) for a in actors]
            done, late = await asyncio.wait(calls, timeout=period)
            for call in done:
                call.exception()  # retrieved: a dead rank is the watchers' and the recovery's business
            for call in late:
                call.cancel()

    async def stop(self) -> None:
        if self.state == "stopped":
            return
        self._move("stopped")
        # NOTE: a recovery under way is not cancelled: its build runs on a thread that would go on and
        # leak the gang; the recovery sees "stopped" after its next await and tears that gang down
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        for watcher in self._watchers:
            watcher.cancel()
        if self._scaling_task is not None:
            self._scaling_task.cancel()
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self.client is not None:
            self.client.close()
        gang, self.gang = self.gang, None
        if gang is not None:
            await asyncio.to_thread(destroy_gang, gang)
        if self.registry is not None:
            self.registry.forget(self.name)

    def _move(self, new: str) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"gang {self.name}: illegal transition {self.state} -> {new}")
        log.info("gang %s: %s -> %s", self.name, self.state, new)
        self.state = new

    async def _build(self, failed: Gang | None = None, hung: set[int] = frozenset()) -> None:
        """A new gang under a new epoch (or `failed` again, its survivors kept: `recover_gang`), warmed
        up by one token; on any failure it is torn down."""
        num_ranks = len(failed.ranks) if failed else self.config.attention_workers + self.config.expert_workers
        self.startup = GangStartup(self.name, num_ranks, self.application, BoardPublisher())
        if failed is not None:
            gang = await asyncio.to_thread(recover_gang, failed, self.startup, hung=hung)
        else:
            gang = await asyncio.to_thread(build_gang, self.config, self.pg, bundle_offset=self.bundle_offset,
                                           name=self.name, application=self.application, startup=self.startup,
                                           placement=self.placement, lease=self._lease(),
                                           on_change=self._save if self.registry else None)
        self.gang = gang
        self.epoch += 1
        epoch = self.epoch
        self.client = self._dial(gang, epoch)
        try:
            self._check_not_stopped()
            await self._warm_up()
            self._check_not_stopped()
        except BaseException:
            self.client.close("the build failed")
            if self.gang is gang:
                self.gang = None
            await asyncio.to_thread(destroy_gang, gang)
            raise
        self.last_build_bytes = sum(done for done, _ in self.startup.rank_bytes.values())

    def _dial(self, gang: Gang, epoch: int) -> GangClient:
        def broken(reason: str, gang_failed: bool) -> None:
            if gang_failed:
                self._on_broken(reason, epoch)
            elif self.epoch == epoch and self.gang is gang:  # only this process's channel failed: dial again
                self.client = self._dial(gang, epoch)

        return GangClient(self._serving(gang), f"supervisor-{self.name}-{epoch}", on_broken=broken, epoch=epoch,
                          version=self.attention_version)

    def _serving(self, gang: Gang) -> list:
        """The attention ranks that take new requests: all but those leaving."""
        return gang.attention[:len(gang.attention) - self.leaving_ranks]

    def serving_attention(self) -> list:
        return self._serving(self.gang) if self.gang else []

    def _now_ready(self) -> None:
        self._move("ready")
        self._save(self.gang)
        self._monitor_task = asyncio.create_task(self._monitor(self.epoch))
        self._watchers = [asyncio.create_task(self._watch_steps(self.epoch, actor)) for actor in self.gang.ranks]
        spares, wanted = self._spares_task, self.config.spares + self.config.attention_spares
        if wanted and (spares is None or spares.done() or self._spares_gang is not self.gang):
            self._spares_gang, self._spares_task = self.gang, asyncio.create_task(self._keep_spares(self.gang))
        if self.scaler is not None and (self._scaling_task is None or self._scaling_task.done()):
            self._scaling_task = asyncio.create_task(self.scaler.run())

    async def _keep_spares(self, gang: Gang) -> None:
        """Warm spares up to `config.spares` and `attention_spares`, started while the gang serves (after its
        build or recovery)."""
        try:
            await asyncio.to_thread(keep_spares, gang)
        except Exception as exc:  # no room for one now: the gang serves on, a failure starts a process
            log.warning("gang %s: a warm spare did not start: %s: %s", self.name, type(exc).__name__, exc)

    def _check_not_stopped(self) -> None:
        if self.state == "stopped":
            raise Stopped(f"gang {self.name} was stopped")

    def attention(self) -> tuple[int, list]:
        """The epoch of the gang now serving and its attention workers' handles, for consumers that
        stream from them directly (a new epoch: the gang was rebuilt, make a new `GangClient`)."""
        self.health()
        return self.epoch, self._serving(self.gang)

    def ready(self) -> bool:
        """Serving: this gang has produced a token since it was (re)built, and it is not leaving."""
        return self.state == "ready" and not self.draining

    async def requests(self) -> int:
        """Requests its attention workers hold, running or waiting, as of each one's last step."""
        gang = self.gang
        if gang is None or self.state != "ready":
            return 0
        loads = await asyncio.gather(*(a.requests_held.remote() for a in gang.attention), return_exceptions=True)
        return sum(n for n in loads if isinstance(n, int))

    async def drain(self, grace_s: float) -> None:
        """Leave without losing a request: take no new one (consumers see `ready` false at once, and a
        request that reaches a worker anyway is refused with `Draining`), let the running ones finish
        within `grace_s`, then end the rest with `Draining` at a step boundary: consumers resume them on
        other gangs, token-exactly. Call `stop()` after it."""
        if self.draining:
            return
        self.draining = True  # the next status read of every ingress says so
        gang = self.gang
        if gang is None or self.state != "ready":
            return
        start = time.monotonic()
        try:
            await asyncio.gather(*(a.stop_admitting.remote() for a in gang.attention))
            while time.monotonic() - start < grace_s and await self.requests():
                await asyncio.sleep(0.2)
            evicted = await asyncio.gather(*(a.evict.remote() for a in gang.attention))
        except Exception as exc:  # a rank died meanwhile: its requests move as after any failure
            log.warning("gang %s: the drain ended early: %s: %s", self.name, type(exc).__name__, exc)
            return
        log.info("gang %s drained in %.1fs: %d request(s) moved to other gangs", self.name,
                 time.monotonic() - start, sum(evicted))

    # -- attention ranks, while the gang serves -------------------------------------------------------

    async def add_attention_rank(self) -> float:
        """One more attention rank in the running gang (`cluster.gang.grow_attention`): loaded while the
        gang serves, then one agreed pause; consumers follow at their next status read. Returns the
        pause. `ResizeRefused`: nothing changed; any other failure fails the gang (it recovers)."""
        async with self._resizing:
            self.health()
            gang, epoch = self.gang, self.epoch
            try:
                pause = await asyncio.to_thread(grow_attention, gang)
            except ResizeRefused:
                raise
            except Exception as exc:
                self._on_broken(f"adding an attention rank failed: {type(exc).__name__}: {exc}", epoch)
                raise
            self._attention_changed(gang, epoch)
            self._watchers = [w for w in self._watchers if not w.done()]
            self._watchers.append(asyncio.create_task(self._watch_steps(epoch, gang.attention[-1])))
            return pause

    async def remove_attention_rank(self, grace_s: float = 0.0) -> float:
        """The last attention rank leaves the running gang: consumers stop sending it requests (their
        next status read), its running ones get `grace_s` to finish, the rest end with `RankLeaving`
        (resumed token-exactly, on this gang's other ranks or elsewhere), then the gang regroups without
        it. Returns the pause of the regroup."""
        async with self._resizing:
            self.health()
            gang, epoch = self.gang, self.epoch
            check_shrinkable(gang)
            leaving = gang.attention[-1]
            self.leaving_ranks = 1
            self._attention_changed(gang, epoch)
            try:
                start = time.monotonic()
                await asyncio.sleep(2 * STATUS_PERIOD_S)  # every consumer has read the status that omits it
                while time.monotonic() - start < grace_s and await leaving.requests_held.remote():
                    await asyncio.sleep(0.2)
                moved = await leaving.evict.remote(alone=True)
                pause = await asyncio.to_thread(shrink_attention, gang)
            except Exception as exc:
                self._on_broken(f"removing an attention rank failed: {type(exc).__name__}: {exc}", epoch)
                raise
            finally:
                self.leaving_ranks = 0
            log.info("gang %s: attention rank left, %d request(s) moved; %d attention ranks now", self.name, moved,
                     len(gang.attention))
            return pause

    def _attention_changed(self, gang: Gang, epoch: int) -> None:
        if self.epoch != epoch or self.gang is not gang:
            return
        self.attention_version += 1
        self.client.resize(self._serving(gang), self.attention_version)
        self._save(gang)

    async def _warm_up(self) -> None:
        """One single-token request through every layer, so readiness means a token came out."""
        self.startup.enter("warm-up")
        request = GenerateRequest([0], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                                  request_id=f"warmup-{self.epoch}")
        async for batch in self.client.generate_batches(request, None):  # one token: no prefix to share
            for out in batch:
                if out.error is not None:
                    raise out.error
        self.startup.enter("ready")  # pushed before readiness turns true, so a watcher sees it first

    def health(self) -> None:
        if self.state != "ready":
            raise Unavailable(f"gang is {self.state}" + (f": {self.failure}" if self.failure else ""))

    # -- requests ---------------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Submit and stream the request's outputs; typed errors if it is invalid or the gang is down."""
        async for batch in self.generate_batches(request):
            for out in batch:
                yield out

    async def generate_batches(self, request: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        """As `generate`, but every output already there travels together: about one message per step."""
        self.health()
        async for batch in self.client.generate_batches(request, routing.affinity_key(request.prompt_token_ids)):
            yield batch

    # -- failure and recovery ---------------------------------------------------------------------------

    async def _monitor(self, epoch: int) -> None:
        while self.epoch == epoch and self.state == "ready":
            await asyncio.sleep(self.health_period_s)
            if self.epoch != epoch or self.state != "ready":
                return
            checks = [asyncio.ensure_future(r.health.remote()) for r in self.gang.ranks]
            await asyncio.wait(checks, timeout=max(5.0, self.health_period_s))
            silent = {rank for rank, check in enumerate(checks) if not check.done()}
            for check in checks:
                check.cancel()
            failed = [c.exception() for c in checks if c.done() and not c.cancelled() and c.exception()]
            if silent or failed:
                what = (f"ranks {sorted(silent)} did not answer" if silent
                        else f"{type(failed[0]).__name__}: {failed[0]}")
                if silent and self.epoch == epoch and self.state == "ready":
                    self.hangs_found["health_check"] += 1
                self._on_broken(f"a rank failed its health check: {what}", epoch, hung=silent)
                return

    async def _watch_steps(self, epoch: int, actor) -> None:
        """The step watchdog for one rank: wait for it to report a stalled round, then find who is silent."""
        while self._watching(epoch, actor):
            try:
                stall = await actor.wait_stall.remote(WATCH_POLL_S)
            except Exception:  # the rank died or left: its channels and the health check say so
                return
            if stall is None or not self._watching(epoch, actor):
                continue
            # a resize parks and regroups every rank (its own failures fail the gang); one slow answer
            # is not a hang: a rank must stay silent through two probes
            silent = set() if self._resizing.locked() else await self._silent(self.gang.ranks)
            silent = await self._silent(silent) if silent else silent
            ranks = self.gang.ranks if self._watching(epoch, actor) and not self._resizing.locked() else []
            hung = {ranks.index(a) for a in silent if a in ranks}  # those still in the gang, by their rank now
            if not hung:  # a long round (a big prefill), or a resize: nobody is hung
                log.info("gang %s: rank %d waited %.1fs in round %d (deadline %.1fs); every rank answered",
                         self.name, stall["rank"], stall["stalled_s"], stall["round"], stall["deadline_s"])
                await asyncio.sleep(PROBE_S)
                continue
            self.hangs_found["watchdog"] += 1
            self._on_broken(f"the step watchdog: rank {stall['rank']} waited {stall['stalled_s']:.1f}s in round "
                            f"{stall['round']} (deadline {stall['deadline_s']:.1f}s); ranks {sorted(hung)} did not "
                            f"answer twice within {PROBE_S}s", epoch, hung=hung)
            return

    def _watching(self, epoch: int, actor) -> bool:
        return self.epoch == epoch and self.state == "ready" and self.gang is not None and actor in self.gang.ranks

    @classmethod
    async def _silent(cls, actors) -> set:
        """The actors that do not answer within `PROBE_S` (a dead one counts: it cannot answer either)."""
        actors = list(actors)
        return {a for a, state in zip(actors, await cls._states(actors, PROBE_S)) if state is None}

    def _on_broken(self, reason: str, epoch: int, hung: set[int] = frozenset()) -> None:
        """The gang of `epoch` failed (a channel broke, a health check failed): mark it failed now, so
        health() says so at once, and start the one recovery task. Stale or repeated calls do nothing."""
        if self.epoch != epoch or self.state != "ready":
            return
        log.error("gang %s failed: %s", self.name, reason)
        self._move("failed")
        self.failure = reason
        self.failed_at = time.monotonic()
        self.client.close(reason)
        self._recovery = asyncio.create_task(self._recover(hung))

    async def _recover(self, hung: set[int] = frozenset()) -> None:
        """Rebuild, keeping the ranks that survived when that works, else anew until a build warms up."""
        failed, self.gang = self.gang, None
        if not self.rebuild or self.state == "stopped":
            if failed is not None:
                await asyncio.to_thread(destroy_gang, failed)
            return
        self._recovering = failed
        self._move("rebuilding")
        self.restarts += 1
        while self.state == "rebuilding":
            try:
                await self._build(failed, hung)
            except Stopped:
                return
            except Exception as exc:  # e.g. resources not back yet, or the warm-up failed: try again
                log.error("gang %s rebuild failed: %s", self.name, exc)
                if failed is not None:  # the survivors could not be kept: the next try builds anew
                    await asyncio.to_thread(destroy_gang, failed)
                    failed = self._recovering = None
                    continue
                await asyncio.sleep(2.0)
                continue
            self.last_recovery_s = time.monotonic() - self.failed_at
            self.failure, self._recovering = None, None
            self._now_ready()
            log.warning("gang %s rebuilt %.1fs after it failed (restart %d, %d bytes read)", self.name,
                        self.last_recovery_s, self.restarts, self.last_build_bytes)

    async def stats(self) -> dict:
        """`in_flight`: requests the attention workers' engines hold (running or waiting, whoever sent
        them), as of each one's last step; `requests_per_worker`: requests each has taken since start."""
        answers = await asyncio.gather(*[r.stats.remote() for r in self.gang.ranks],
                                       return_exceptions=True) if self.gang else []
        # a rank that died since the last check: said, not raised (the watchers find it)
        ranks = [a if isinstance(a, dict) else {"rank": i, "error": repr(a)} for i, a in enumerate(answers)]
        attention = [r for r in ranks if "running" in r]
        gang = self.gang
        return {"state": self.state, "restarts": self.restarts, "hangs_found": dict(self.hangs_found),
                "adoptions": self.adoptions,
                "last_recovery_s": self.last_recovery_s,
                "last_build_stages_s": dict(self.startup.stage_seconds) if self.startup else {},
                "last_build_bytes": self.last_build_bytes, "attention_ranks": len(gang.attention) if gang else 0,
                "regroups": gang.regroups if gang else 0,
                "spares": len(gang.spares) if gang else 0, "spares_adopted": gang.spares_adopted if gang else 0,
                "last_regroup_pause_s": gang.last_regroup_pause_s if gang else None,
                "last_join_s": gang.last_join_s if gang else None,
                "attention_events": self.scaler.events if self.scaler else {},
                "in_flight": sum(r["running"] + r["waiting"] for r in attention),
                "requests_per_worker": {r["rank"]: r["submitted"] for r in attention}, "ranks": ranks}
