"""One consumer's view of every gang: which gangs exist, which can take requests, under which epoch,
through which client, with how many of this consumer's requests on each. The ingress asks it for a
stream and knows nothing of gangs beyond that (`router.ingress`).

Gangs are the replicas of one Serve deployment (`gangs`), whose count Serve's controller sets (a
fixed `num_gangs`, or autoscaling). Membership and readiness come from every running gang's status,
read together (`DeploymentHandle.broadcast`) every `STATUS_PERIOD_S`: a gang appears once Serve runs
its replica (built and warm), and one Serve stops leaves the set at once (its status says `draining`
first, when the stop began elsewhere). A gang whose replica died serves on while this consumer's
channel to it holds: its ranks outlive the replica, and the one Serve starts next takes them over.
Each gang is known by the id in its status, for its whole life. A client of a gang's epoch is dialed on first use after a (re)build, and follows the gang's
attention ranks as they join and leave (the status's `attention_version`). A gang seen failing by a
client is marked (`failed_epoch`): no request goes there until a status shows a new epoch. A channel
that failed in this process, the gang alive, is only counted: the next request dials the same epoch
again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from cluster import routing
from cluster.gang_client import GangClient
from cluster.probe import every
from workers.errors import Draining, RankLeaving, Unavailable
from workers.protocol import GenerateRequest, RequestOutput

log = logging.getLogger(__name__)
STATUS_PERIOD_S = 1.0  # between reads of every gang's status
STATUS_TIMEOUT_S = 5.0  # a gang that does not answer a read within this misses it
STATUS_MISSES_ALLOWED = 3  # reads in a row a gang may miss (busy) before it counts as not ready
# while a request waits to resume (its gang failed, none ready), statuses are read this often: the
# recovered gang's first status then reaches it within this, not within STATUS_PERIOD_S
WAITING_STATUS_PERIOD_S = 0.1


async def each_answer(handle, method: str, timeout_s: float) -> list:
    """`method()` of every running replica of `handle`'s deployment: each one's answer, its exception, or
    `TimeoutError` if it did not answer within `timeout_s`, so one hung gang never hides the others.
    (Serve 2.60's public `results_async` times out as a whole: the per-replica results are read here.)"""
    results = await asyncio.wait_for(handle.broadcast(method)._fetch_replica_results_async(), timeout_s)
    calls = [asyncio.ensure_future(r.get_async()) for r in results]
    if not calls:
        return []
    done, late = await asyncio.wait(calls, timeout=timeout_s)
    for call in late:
        call.cancel()
    return [c.exception() or c.result() if c in done else TimeoutError(f"{method} did not answer") for c in calls]


class NoReadyGang(Unavailable):
    """No gang can take a new request now: a first attempt ends here with 503, a retry waits."""


class _Gang:
    """What this consumer knows of one gang (keyed by its id in `GangPool.gangs`)."""

    def __init__(self, status: dict):
        self.status: dict | None = status
        self.client: GangClient | None = None  # for the gang's epoch now serving
        self.ready = False
        self.load = 0  # this consumer's engine requests on it now
        self.requests = 0  # engine requests sent to it since start
        self.misses = 0  # status reads in a row it did not answer
        self.failed_epoch: int | None = None  # seen failing: not ready until rebuilt
        self.channel_failures = 0  # channels that failed here, the gang alive: dialed again
        self.without_replica = False  # serving while its replica is gone (see `GangPool._unseen`)
        # (epoch, attention version, handles), asked once per epoch and attention set
        self.attention_handles: tuple[int, int, list] | None = None


class GangPool:
    def __init__(self, handle, consumer: str, on_status: Callable[[], None] | None = None):
        """`handle`: the `gangs` deployment's handle (`status`, `attention`); `consumer`: this process's
        channel name on every attention worker; `on_status`: called after every status read."""
        self.handle, self.consumer, self.on_status = handle, consumer, on_status
        self.gangs: dict[str, _Gang] = {}
        self.left: list[str] = []  # gangs gone (and drained here) since the last `on_status`: said once
        self._gone: dict[str, _Gang] = {}  # gangs gone with streams of this consumer still on them
        self._watch: asyncio.Task | None = None
        self._read_failing = False
        self._last_read = 0.0  # monotonic start of the last status read
        self._waiting_read: asyncio.Future | None = None  # the one read every waiting request shares

    def start(self) -> None:
        self._watch = asyncio.create_task(every(STATUS_PERIOD_S, self.refresh_all, "the gangs' status watcher"))

    # -- membership and readiness ---------------------------------------------------------------------

    @property
    def ready(self) -> list[str]:
        return [name for name, g in self.gangs.items() if g.ready]

    async def refresh_all(self) -> bool:
        """Every running gang's status read now; True when at least one gang exists and all are ready."""
        self._last_read = time.monotonic()
        try:
            statuses = await each_answer(self.handle, "status", STATUS_TIMEOUT_S)
        except Exception as exc:  # a timeout (busy replicas on loaded cores), or no gang deployed yet
            if not self._read_failing:  # said once per run of failures
                log.warning("reading the gangs' status failed: %r", exc)
            self._read_failing = True
            statuses = None
        else:
            self._read_failing = False
        if statuses is None:  # proves nothing of any one gang; a gang silent this long is not ready
            for g in self.gangs.values():
                g.misses += 1
                g.ready = g.ready and g.misses < STATUS_MISSES_ALLOWED
        else:
            seen = {s["gang"]: s for s in statuses if isinstance(s, dict)}
            for name, status in seen.items():
                self._update(name, status)
            everyone_answered = len(seen) == len(statuses)
            for name in [n for n in self.gangs if n not in seen]:
                self._unseen(name, everyone_answered)
        if self.on_status is not None:
            self.on_status()
            self.left = []
        return bool(self.gangs) and all(g.ready for g in self.gangs.values())

    def _update(self, name: str, status: dict) -> None:
        g = self.gangs.get(name)
        if g is None:  # new, or back (its streams kept their client: one channel per consumer and worker)
            g = self.gangs[name] = self._gone.pop(name, None) or _Gang(status)
            log.info("gang %s joined (%s)", name, status["state"])
        g.status, g.misses, g.without_replica = status, 0, False
        g.ready = bool(status["ready"] and not status.get("draining") and status.get("epoch") != g.failed_epoch)
        client = g.client
        # a new epoch proves the old gang gone; a status that timed out proves nothing (a busy replica)
        if client is not None and (client.broken or status.get("epoch") != client.epoch):
            g.client = None
            client.close("the gang was rebuilt")
        elif client is not None and status.get("state") in ("failed", "rebuilding"):
            # its supervisor found it failed (a hang: the workers' own collectives would only time out
            # later): its streams end now and resume when a gang is ready
            g.client, g.failed_epoch, g.ready = None, client.epoch, False
            client.close(f"the gang failed: {status.get('failure') or status['state']}")

    def _unseen(self, name: str, everyone_answered: bool) -> None:
        """A gang missing from a status read. One this consumer streams from, ready at its last status,
        lost its replica (dead or silent): its ranks outlive it, a replica Serve starts in its place takes
        them over, so it stays ready until its channel breaks (`_broke`). Otherwise: gone from Serve's
        running replicas when everyone else answered, else one more read missed."""
        g = self.gangs[name]
        if g.ready and g.client is not None and not g.client.broken:
            if not g.without_replica:
                log.warning("gang %s: its replica does not answer; its ranks serve on", name)
            g.without_replica = True
            return
        if everyone_answered:  # no longer among the running replicas: Serve stops it, or it died
            self._forget(name)
        else:
            g.misses += 1
            g.ready = g.ready and g.misses < STATUS_MISSES_ALLOWED

    def _forget(self, name: str) -> None:
        """A gang Serve stopped (or that stopped answering): no new request goes there; streams already
        on it end when the gang drains them, or fail over when it dies."""
        g = self.gangs.pop(name)
        log.info("gang %s left", name)
        g.ready = False
        if g.load:
            self._gone[name] = g  # leaving: its last stream closes the client and says it left
            return
        self.left.append(name)
        if g.client is not None:
            g.client.close("the gang left")

    @property
    def leaving(self) -> dict[str, int]:
        """Gangs gone from Serve's running set that still carry this consumer's streams: their load."""
        return {name: g.load for name, g in self._gone.items()}

    def _stream_ended(self, name: str, g: _Gang) -> None:
        g.load -= 1
        if name not in self.gangs and not g.load and self._gone.pop(name, None) is g:  # its last stream
            self.left.append(name)
            if g.client is not None:
                g.client.close("the gang left")

    def _broke(self, name: str, epoch: int, gang_failed: bool) -> None:
        """A client of this gang saw it fail: no request goes there until a status shows a new epoch. A
        channel that failed in this process, the gang alive, is dialed again by the next request."""
        g = self.gangs.get(name)
        if g is None:
            return
        if not gang_failed:
            g.channel_failures += 1
            return
        g.failed_epoch = epoch
        if g.status is None or g.status.get("epoch") == epoch:
            g.ready = False

    # -- requests -------------------------------------------------------------------------------------

    async def stream(self, request: GenerateRequest, retry: bool) -> AsyncIterator[list[RequestOutput]]:
        """The request's output batches from one ready gang (prefix affinity balanced against load);
        a first try finds none with `NoReadyGang`, a retry waits for one (the caller's deadline bounds
        the wait). The affinity key is computed here once, for the gang and its attention worker."""
        key = routing.affinity_key(request.prompt_token_ids)
        name = await self._wait_for_gang(key) if retry else await self._pick_now(key)
        g = self.gangs[name]
        g.load += 1
        g.requests += 1
        try:
            batches = (await self._client(name, g)).generate_batches(request, key)
            try:
                async for batch in batches:
                    yield batch
            finally:
                await batches.aclose()
        except Draining as exc:  # it began leaving before this consumer heard: no more requests there
            if not isinstance(exc, RankLeaving):  # (one attention rank leaving: the gang serves on)
                g.ready = False
            raise
        finally:
            self._stream_ended(name, g)

    def _pick(self, key: bytes | None) -> str:
        names = sorted(self.gangs)
        ready = [i for i, name in enumerate(names) if self.gangs[name].ready]
        if not ready:
            raise NoReadyGang("no gang can take requests now (starting, failed, rebuilding or leaving); retry")
        # affinity by gang id: a prefix keeps its gang (and its cached blocks) while others come and go
        return names[routing.pick(key, [self.gangs[name].load for name in names], ready, names=names)]

    async def _pick_now(self, key: bytes | None) -> str:
        """A first try: a ready gang, the statuses read again when none is (one may have come up since
        the last read); else `NoReadyGang`."""
        try:
            return self._pick(key)
        except NoReadyGang:
            await self.refresh_all()
            return self._pick(key)

    async def _wait_for_gang(self, key: bytes | None) -> str:
        while True:
            try:
                return self._pick(key)
            except NoReadyGang:
                await self._read_while_waiting()

    async def _read_while_waiting(self) -> None:
        """One status read, shared by every request waiting for a gang, at most every
        `WAITING_STATUS_PERIOD_S`: a failover's pause is not stretched by the watcher's period."""
        if self._waiting_read is None or self._waiting_read.done():
            self._waiting_read = asyncio.ensure_future(self._paced_read())
        await asyncio.shield(self._waiting_read)

    async def _paced_read(self) -> None:
        await asyncio.sleep(max(0.0, self._last_read + WAITING_STATUS_PERIOD_S - time.monotonic()))
        try:
            await self.refresh_all()
        except Exception as exc:  # the watcher logs a read that keeps failing; a waiter only tries again
            log.debug("a status read for waiting requests failed: %r", exc)

    async def _client(self, name: str, g: _Gang) -> GangClient:
        """This consumer's client of the gang's epoch now serving: made on first use after a (re)build."""
        client = g.client
        version = (g.status or {}).get("attention_version", 0)
        if client is None or client.broken or client.version != version:
            epoch, version, attention = await self._attention(name, g)
            if epoch == g.failed_epoch:  # its supervisor has not noticed the failure yet
                raise Unavailable(f"gang {name} is failing")
            client = g.client
            if client is None or client.broken or client.epoch != epoch:  # another request may have made it
                client = g.client = GangClient(
                    attention, self.consumer, epoch=epoch, version=version,
                    on_broken=lambda _reason, gang_failed: self._broke(name, epoch, gang_failed))
            elif client.version != version:  # attention ranks joined or left the running gang
                client.resize(attention, version)
        return client

    async def _attention(self, name: str, g: _Gang) -> tuple[int, int, list]:
        """The gang's epoch, attention version and attention workers' handles. Serve cannot address one
        replica, so every gang is asked (rarely: once per new epoch or attention set seen) and each
        answer kept by its gang."""
        status = g.status or {}
        wanted = (status.get("epoch"), status.get("attention_version", 0))
        if g.attention_handles is None or g.attention_handles[:2] != wanted:
            try:
                answers = await each_answer(self.handle, "attention_of", STATUS_TIMEOUT_S)
            except Exception:
                raise Unavailable(f"gang {name} is unreachable") from None
            for answer in answers:
                if isinstance(answer, dict) and answer["gang"] in self.gangs and answer["epoch"] is not None:
                    self.gangs[answer["gang"]].attention_handles = (answer["epoch"], answer.get("version", 0),
                                                                    answer["attention"])
        if g.attention_handles is None:
            raise Unavailable(f"gang {name} is not serving")
        return g.attention_handles

    def stats(self) -> dict:
        names = sorted(self.gangs)
        return {"gangs": names, "ready": [self.gangs[n].ready for n in names],
                "in_flight": [self.gangs[n].load for n in names], "requests": [self.gangs[n].requests for n in names],
                "channel_failures": [self.gangs[n].channel_failures for n in names], "consumer": self.consumer}
