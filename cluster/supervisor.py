"""The gang supervisor: builds the gang, watches it, rebuilds it; its own requests (the warm-up, the
in-process benchmark and tests) go through a `GangClient` like any consumer's.

Consumers (the ingress replicas) ask `attention()` for the gang's attention worker handles and its
epoch, and stream from those workers themselves: no request's tokens pass through this process. A
dead rank, a rank whose collective failed (its channels break) or a failed health check marks the
gang failed: in-flight requests end with the typed `Unavailable` error, new ones are refused, and the
gang is rebuilt under a new epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from ray.exceptions import RayError, GetTimeoutError

from cluster import routing
from cluster.config import GangConfig
from cluster.gang import Gang, build_gang, destroy_gang
from cluster.gang_client import GangClient
from cluster.startup import BoardPublisher, GangStartup
from workers.errors import EngineError, Unavailable
from workers.expert_parallel import Placement
from workers.protocol import GenerateRequest, RequestOutput
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class GangSupervisor:
    def __init__(self, config: GangConfig, health_period_s: float = 1.0, rebuild: bool = True,
                 pg=None, bundle_offset: int = 0, name: str = "gang", application: str = "maverick",
                 placement: Placement | None = None):
        self.config, self.name, self.application = config, name, application
        self.placement = placement  # None: experts split contiguously over the expert ranks
        self.pg, self.bundle_offset = pg, bundle_offset  # a Serve replica's placement group, if any
        self.health_period_s = health_period_s
        self.rebuild = rebuild
        self.gang: Gang | None = None
        self.startup: GangStartup | None = None  # this build's stages, bytes loaded, ranks up
        self.state = "starting"  # starting | ready | failed | rebuilding | stopped
        self.failure: str | None = None
        self.restarts = 0
        self.client: GangClient | None = None  # this supervisor's own requests
        self._tasks: list[asyncio.Task] = []
        self.epoch = 0  # bumped per build, so stale watchers of a dead gang stop
        self.warm = False
        self.prefix_tokens = routing.DEFAULT_PREFIX_TOKENS

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        num_ranks = self.config.attention_workers + self.config.expert_workers
        self.startup = GangStartup(self.name, num_ranks, self.application, BoardPublisher())
        self.gang = await asyncio.to_thread(build_gang, self.config, self.pg, bundle_offset=self.bundle_offset,
                                            name=self.name, application=self.application, startup=self.startup,
                                            placement=self.placement)
        self.epoch += 1
        self.state, self.failure, self.warm = "ready", None, False
        epoch = self.epoch
        self.client = GangClient(self.gang.attention, f"supervisor-{self.name}-{epoch}", self.prefix_tokens,
                                 on_broken=lambda reason: self._fail_soon(reason, epoch), epoch=epoch)
        self._tasks = [asyncio.create_task(self._monitor(epoch))]
        await self._warm_up()

    async def stop(self) -> None:
        self.state = "stopped"
        for task in self._tasks:
            task.cancel()
        if self.client is not None:
            self.client.close()
        if self.gang is not None:
            await asyncio.to_thread(destroy_gang, self.gang)

    def attention(self) -> tuple[int, list]:
        """The epoch of the gang now serving and its attention workers' handles, for consumers that
        stream from them directly (a new epoch: the gang was rebuilt, make a new `GangClient`)."""
        self.health()
        return self.epoch, list(self.gang.attention)

    def ready(self) -> bool:
        """Serving, and this gang has produced a token since it was (re)built."""
        return self.state == "ready" and self.warm

    async def _warm_up(self) -> None:
        """One single-token request through every layer, so readiness means a token came out."""
        self.startup.enter("warm-up")
        request = GenerateRequest([0], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                                  request_id=f"warmup-{self.epoch}")
        async for out in self.generate(request):
            if out.error is not None:
                raise out.error
        self.startup.enter("ready")  # pushed before readiness turns true, so a watcher sees it first
        self.warm = True

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
        async for batch in self.client.generate_batches(request):
            yield batch

    # -- background -----------------------------------------------------------------------------------

    async def _monitor(self, epoch: int) -> None:
        while self.epoch == epoch and self.state == "ready":
            await asyncio.sleep(self.health_period_s)
            refs = [r.health.remote() for r in self.gang.ranks]
            try:
                await asyncio.wait_for(asyncio.gather(*refs), timeout=max(5.0, 5 * self.health_period_s))
            except (RayError, EngineError, asyncio.TimeoutError, GetTimeoutError) as exc:
                await self._fail(f"a rank failed its health check: {type(exc).__name__}: {exc}", epoch)
                return

    def _fail_soon(self, reason: str, epoch: int) -> None:
        """Failed from now on (health() says so at once); the teardown and rebuild follow on a task."""
        if self.epoch == epoch and self.state == "ready":
            self._mark_failed(reason)
            asyncio.create_task(self._tear_down())

    async def _fail(self, reason: str, epoch: int) -> None:
        if self.epoch == epoch and self.state == "ready":
            self._mark_failed(reason)
            await self._tear_down()

    def _mark_failed(self, reason: str) -> None:
        log.error("gang failed: %s", reason)
        self.state, self.failure = "failed", reason
        self.client.close(reason)

    async def _tear_down(self) -> None:
        gang, self.gang = self.gang, None
        await asyncio.to_thread(destroy_gang, gang)
        if self.rebuild:
            asyncio.create_task(self._rebuild())

    async def _rebuild(self) -> None:
        self.state = "rebuilding"
        self.restarts += 1
        started = time.monotonic()
        while self.state == "rebuilding":
            try:
                await self.start()
                log.warning("gang rebuilt in %.1fs (restart %d)", time.monotonic() - started, self.restarts)
                return
            except Exception as exc:  # e.g. resources not back yet: try again
                log.error("gang rebuild failed: %s", exc)
                await asyncio.sleep(2.0)

    async def stats(self) -> dict:
        """`in_flight`: requests the attention workers' engines hold (running or waiting, whoever sent
        them), as of each one's last step; `requests_per_worker`: requests each has taken since start."""
        ranks = await asyncio.gather(*[r.stats.remote() for r in self.gang.ranks]) if self.gang else []
        attention = [r for r in ranks if "running" in r]
        return {"state": self.state, "restarts": self.restarts,
                "in_flight": sum(r["running"] + r["waiting"] for r in attention),
                "requests_per_worker": {r["rank"]: r["submitted"] for r in attention}, "ranks": ranks}
