"""The gang supervisor: requests in, per-request output streams out, failure detection and rebuild.

About one Ray call per request (`submit`, then a `wake` to every rank) and one per step per attention
worker (`next_outputs`, carrying every request's new tokens of that step), never one per layer or
token. A dead rank, or a rank whose collective failed, marks the gang failed: its in-flight requests
end with the typed `Unavailable` error, new ones are refused, and the gang is rebuilt.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError, RayError, GetTimeoutError

from cluster import routing
from cluster.config import GangConfig
from cluster.gang import Gang, build_gang, destroy_gang
from cluster.startup import BoardPublisher, GangStartup
from workers.errors import EngineError, Unavailable
from workers.expert_parallel import Placement
from workers.protocol import GenerateRequest, RequestOutput
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class _Stream:
    def __init__(self, choices: int, worker: int):
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.open_choices = choices
        self.worker = worker


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
        self._streams: dict[str, _Stream] = {}
        self._wake_gen = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self._epoch = 0  # bumped per build, so stale pollers of a dead gang stop
        self.warm = False
        self.prefix_tokens = routing.DEFAULT_PREFIX_TOKENS
        self.requests_per_worker: dict[int, int] = {}  # since start, for stats and routing tests

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        num_ranks = self.config.attention_workers + self.config.expert_workers
        self.startup = GangStartup(self.name, num_ranks, self.application, BoardPublisher())
        self.gang = await asyncio.to_thread(build_gang, self.config, self.pg, bundle_offset=self.bundle_offset,
                                            name=self.name, application=self.application, startup=self.startup,
                                            placement=self.placement)
        self._epoch += 1
        self.state, self.failure, self.warm = "ready", None, False
        epoch = self._epoch
        self._tasks = [asyncio.create_task(self._poll(i, epoch)) for i in range(len(self.gang.attention))]
        self._tasks.append(asyncio.create_task(self._monitor(epoch)))
        await self._warm_up()

    async def stop(self) -> None:
        self.state = "stopped"
        for task in self._tasks:
            task.cancel()
        if self.gang is not None:
            await asyncio.to_thread(destroy_gang, self.gang)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def ready(self) -> bool:
        """Serving, and this gang has produced a token since it was (re)built."""
        return self.state == "ready" and self.warm

    async def _warm_up(self) -> None:
        """One single-token request through every layer, so readiness means a token came out."""
        self.startup.enter("warm-up")
        request = GenerateRequest([0], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                                  request_id=f"warmup-{self._epoch}")
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
        worker = self._pick_worker(request.prompt_token_ids)
        self.requests_per_worker[worker] = self.requests_per_worker.get(worker, 0) + 1
        stream = _Stream(request.params.n, worker)
        self._streams[request.request_id] = stream
        try:
            try:
                await self.gang.attention[worker].submit.remote(request)
            except RayError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, EngineError):  # the typed error itself, not Ray's wrapper
                    raise cause from None
                raise Unavailable(f"attention worker {worker} is unreachable: {type(exc).__name__}") from None
            self._wake_all()
            while stream.open_choices:
                batch = [await stream.queue.get()]
                while not stream.queue.empty():
                    batch.append(stream.queue.get_nowait())
                stream.open_choices -= sum(out.finished for out in batch)
                yield batch
        finally:
            if self._streams.pop(request.request_id, None) is not None and stream.open_choices:
                self._abort_on(stream.worker, request.request_id)  # the consumer went away before the end

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._abort_on(stream.worker, request_id)

    def _abort_on(self, worker: int, request_id: str) -> None:
        if self.gang is not None and self.state == "ready":
            self.gang.attention[worker].abort.remote(request_id)
            self._wake_all()

    def _pick_worker(self, prompt_token_ids: list[int]) -> int:
        """Prefix affinity balanced against load: a shared long prefix finds the worker that cached it."""
        load = [0] * len(self.gang.attention)
        for s in self._streams.values():
            load[s.worker] += 1
        return routing.pick(routing.affinity_key(prompt_token_ids, self.prefix_tokens), load)

    def _wake_all(self) -> None:
        generation = next(self._wake_gen)
        for rank in self.gang.ranks:
            rank.wake.remote(generation)

    # -- background -----------------------------------------------------------------------------------

    async def _poll(self, worker: int, epoch: int) -> None:
        actor = self.gang.attention[worker]
        while self._epoch == epoch and self.state in ("ready", "failed"):
            try:
                outputs = await actor.next_outputs.remote(1.0)
            except (RayActorError, RayError) as exc:
                await self._fail(f"attention worker {worker} died: {type(exc).__name__}", epoch)
                return
            failed = next((o.error for o in outputs if isinstance(o.error, Unavailable)), None)
            if failed is not None:  # the rank's collective failed: the gang is down, say so first
                await self._fail(f"attention worker {worker}: {failed.message}", epoch)
                return
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.queue.put_nowait(out)

    async def _monitor(self, epoch: int) -> None:
        while self._epoch == epoch and self.state == "ready":
            await asyncio.sleep(self.health_period_s)
            refs = [r.health.remote() for r in self.gang.ranks]
            try:
                await asyncio.wait_for(asyncio.gather(*refs), timeout=max(5.0, 5 * self.health_period_s))
            except (RayError, EngineError, asyncio.TimeoutError, GetTimeoutError) as exc:
                await self._fail(f"a rank failed its health check: {type(exc).__name__}: {exc}", epoch)
                return

    async def _fail(self, reason: str, epoch: int) -> None:
        if self._epoch != epoch or self.state != "ready":
            return
        log.error("gang failed: %s", reason)
        self.state, self.failure = "failed", reason
        error = Unavailable(f"the gang serving this request failed ({reason}); retry")
        for request_id, stream in list(self._streams.items()):
            for index in range(stream.open_choices):
                stream.queue.put_nowait(RequestOutput(request_id, [], None, "error", error=error, index=index))
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
        ranks = await asyncio.gather(*[r.stats.remote() for r in self.gang.ranks]) if self.gang else []
        return {"state": self.state, "restarts": self.restarts, "in_flight": self.in_flight,
                "requests_per_worker": dict(self.requests_per_worker), "ranks": ranks}
