"""One consumer's view of every gang: which can take requests, under which epoch, through which client,
with how many of this consumer's requests on each. The ingress asks it for a stream and knows nothing
of gangs beyond that (`router.ingress`).

Readiness comes from each gang replica's status, long-polled (`watch_status` answers at a change of
state, else after `STATUS_WAIT_S`), so an idle service exchanges one message per gang every few
seconds. A client of a gang's epoch is dialed on first use after a (re)build. A gang seen failing by a
client is marked (`failed_epoch`): no request goes there until a status shows a new epoch. A channel
that failed in this process, the gang alive, is only counted: the next request dials the same epoch
again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable

from cluster import routing
from cluster.gang_client import GangClient
from cluster.probe import every
from workers.errors import Unavailable
from workers.protocol import GenerateRequest, RequestOutput

log = logging.getLogger(__name__)
STATUS_TIMEOUT_S = 5.0  # beyond a long-poll's own wait
STATUS_WAIT_S = 10.0  # a gang's status long-poll answers at a change, else after this
STATUS_RETRY_S = 0.5  # between long-polls (a change meanwhile is answered at once)
STATUS_MISSES_ALLOWED = 3  # polls in a row a gang may miss before it counts as not ready


class NoReadyGang(Unavailable):
    """No gang can take a new request now: a first attempt ends here with 503, a retry waits."""


class GangPool:
    def __init__(self, gangs: list, consumer: str, on_status: Callable[[], None] | None = None):
        """`gangs`: each gang replica's handle (`watch_status`, `attention`); `consumer`: this process's
        channel name on every attention worker; `on_status`: called after every status read."""
        n = len(gangs)
        self.gangs, self.consumer, self.on_status = gangs, consumer, on_status
        self.clients: list[GangClient | None] = [None] * n  # for each gang's epoch now serving
        self.statuses: list[dict | None] = [None] * n
        self.ready = [False] * n
        self.load = [0] * n  # this consumer's engine requests on each gang now
        self.requests = [0] * n  # engine requests sent to each gang since start
        self.status_misses = [0] * n  # status polls in a row that timed out
        self.failed_epoch: list[int | None] = [None] * n  # seen failing: not ready until rebuilt
        self.channel_failures = [0] * n  # channels that failed here, the gang alive: dialed again
        self._watch: asyncio.Task | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._watch_gangs())

    # -- readiness ------------------------------------------------------------------------------------

    async def _watch_gangs(self) -> None:
        """Keep each gang's readiness fresh, so requests skip a failed or rebuilding gang. A round that
        fails is logged and the next one runs (a dead watcher would freeze readiness)."""
        await asyncio.gather(*(every(STATUS_RETRY_S, functools.partial(self.refresh, i, STATUS_WAIT_S),
                                     f"gang {i}'s status watcher") for i in range(len(self.gangs))))

    async def refresh(self, i: int, wait_s: float) -> None:
        """Gang i's status once it differs from the one known here (at once if `wait_s` is 0)."""
        known = self.statuses[i] if wait_s else None
        try:
            self.statuses[i] = await asyncio.wait_for(self.gangs[i].watch_status.remote(known, wait_s),
                                                      wait_s + STATUS_TIMEOUT_S)
            self.status_misses[i] = 0
        except asyncio.TimeoutError:  # a busy replica on loaded cores misses a poll; a hung one all of them
            self.status_misses[i] += 1
            if self.status_misses[i] == STATUS_MISSES_ALLOWED:
                log.warning("gang %d: %d status polls in a row timed out; not ready until it answers", i,
                            STATUS_MISSES_ALLOWED)
            if self.status_misses[i] >= STATUS_MISSES_ALLOWED:
                self.statuses[i] = None
        except Exception as exc:  # the replica is gone: not ready at once
            if self.statuses[i] is not None:  # said once per outage, not at every retry
                log.warning("gang %d: its status failed (%s: %s); not ready until it answers", i,
                            type(exc).__name__, exc)
            self.statuses[i] = None
        client, status = self.clients[i], self.statuses[i]
        self.ready[i] = bool(status and status["ready"] and status.get("epoch") != self.failed_epoch[i])
        # a new epoch proves the old gang gone; a status that timed out proves nothing (a busy replica)
        if client is not None and (client.broken or (status is not None and status.get("epoch") != client.epoch)):
            self.clients[i] = None
            client.close("the gang was rebuilt")
        if self.on_status is not None:
            self.on_status()

    async def refresh_all(self) -> bool:
        """Every gang's status read now, not the watcher's; True when all of them are ready."""
        await asyncio.gather(*(self.refresh(i, 0.0) for i in range(len(self.gangs))))
        return all(self.ready)

    def _broke(self, gang: int, epoch: int, gang_failed: bool) -> None:
        """A client of this gang saw it fail: no request goes there until a status shows a new epoch. A
        channel that failed in this process, the gang alive, is dialed again by the next request."""
        if not gang_failed:
            self.channel_failures[gang] += 1
            return
        self.failed_epoch[gang] = epoch
        status = self.statuses[gang]
        if status is None or status.get("epoch") == epoch:
            self.ready[gang] = False

    # -- requests -------------------------------------------------------------------------------------

    async def stream(self, request: GenerateRequest, retry: bool) -> AsyncIterator[list[RequestOutput]]:
        """The request's output batches from one ready gang (prefix affinity balanced against load);
        a first try finds none with `NoReadyGang`, a retry waits for one (the caller's deadline bounds
        the wait). The affinity key is computed here once, for the gang and its attention worker."""
        key = routing.affinity_key(request.prompt_token_ids)
        gang = await self._wait_for_gang(key) if retry else self._pick(key)
        self.load[gang] += 1
        self.requests[gang] += 1
        try:
            batches = (await self._client(gang)).generate_batches(request, key)
            try:
                async for batch in batches:
                    yield batch
            finally:
                await batches.aclose()
        finally:
            self.load[gang] -= 1

    def _pick(self, key: bytes | None) -> int:
        ready = [i for i, ok in enumerate(self.ready) if ok]
        if not ready:
            raise NoReadyGang("no gang can take requests now (starting, failed or rebuilding); retry")
        return routing.pick(key, self.load, ready)

    async def _wait_for_gang(self, key: bytes | None) -> int:
        while True:
            try:
                return self._pick(key)
            except NoReadyGang:
                await asyncio.sleep(0.1)

    async def _client(self, gang: int) -> GangClient:
        """This consumer's client of the gang's epoch now serving: made on first use after a (re)build."""
        client = self.clients[gang]
        if client is None or client.broken:
            try:
                epoch, attention = await self.gangs[gang].attention.remote()
            except Exception as exc:  # rebuilding, or the replica is gone
                cause = getattr(exc, "cause", None)
                raise cause if isinstance(cause, Unavailable) else Unavailable(f"gang {gang} is unreachable") from None
            if epoch == self.failed_epoch[gang]:  # its supervisor has not noticed the failure yet
                raise Unavailable(f"gang {gang} is failing")
            client = self.clients[gang]
            if client is None or client.broken or client.epoch != epoch:  # another request may have made it
                client = self.clients[gang] = GangClient(
                    attention, self.consumer, epoch=epoch,
                    on_broken=lambda _reason, gang_failed: self._broke(gang, epoch, gang_failed))
        return client

    def stats(self) -> dict:
        return {"ready": list(self.ready), "in_flight": list(self.load), "requests": list(self.requests),
                "channel_failures": list(self.channel_failures), "consumer": self.consumer}
