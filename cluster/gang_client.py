"""One consumer's connection to one gang's attention workers: submit, stream, abort.

A consumer (an ingress replica, or the gang supervisor for its warm-up) submits each request straight
to the attention worker it picks (prefix affinity balanced against load) and holds one streaming call
per attention worker (`AttentionWorker.outputs`), through which every step's outputs of all its
requests arrive as one message; they are sorted into per-request queues here. So a token crosses one
process boundary between the engine and the consumer, and a step costs one message per consumer, not
one per request.

The gang may add attention ranks at the end and remove the last ones while it serves (`resize`, and
one rank's `RankLeaving`): a leaving rank takes no new request here, its requests end with
`RankLeaving` (the consumer moves them, planned) and only its channel closes; the others go on.

A channel that breaks (the worker died, its wave failed, the gang was torn down) ends every request
still open on this client with `Unavailable`, and the client refuses new ones: the consumer makes a
new client for the rebuilt gang. A channel that fails here, with the gang alive (a batch that does not
unpickle, a bug of ours), also ends this client and its requests (aborted in the engine), but
`on_broken` hears that the gang did not fail: the consumer dials the same gang again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ray.exceptions import (LocalRayletDiedError, NodeDiedError, ObjectLostError, RayActorError, RayError,
                            WorkerCrashedError)

from cluster import routing
from workers.errors import Draining, EngineError, RankLeaving, Unavailable
from workers.protocol import GenerateRequest, RequestOutput

log = logging.getLogger(__name__)
# what Ray raises on a channel whose worker is gone; anything else but the rank's own `Unavailable` is local
WORKER_GONE = (RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError, LocalRayletDiedError)


class _Stream:
    def __init__(self, choices: int, worker: int):
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.open_choices = choices  # not yet finished as read by the consumer
        self.unfinished = set(range(choices))  # not yet finished as queued: a failure ends these
        self.worker = worker

    def put(self, out: RequestOutput) -> None:
        if out.index in self.unfinished:
            if out.finished:
                self.unfinished.discard(out.index)
            self.queue.put_nowait(out)


class GangClient:
    def __init__(self, attention: list, consumer: str, on_broken=None, epoch: int = 0, version: int = 0):
        self.attention = list(attention)  # actor handles, rank order
        self.epoch = epoch  # the gang build these handles belong to
        self.version = version  # the gang's attention set these handles are (`resize`)
        self.retired: set[int] = set()  # workers that left (or leave) the gang: nothing new goes there
        self.consumer = consumer  # the channel name on every attention worker: unique per consumer
        self.on_broken = on_broken  # called once, (reason, gang_failed), when a channel breaks
        self.broken: str | None = None
        self.gang_failed = False  # broken because the gang failed, not by a failure in this process
        self.load = [0] * len(attention)  # this client's open streams on each attention worker
        self._streams: dict[str, _Stream] = {}
        self._listeners = [asyncio.create_task(self._listen(i)) for i in range(len(attention))]

    async def generate_batches(self, request: GenerateRequest,
                               affinity: bytes | None) -> AsyncIterator[list[RequestOutput]]:
        """Submit and stream the request's outputs, every output already there together; typed errors
        if it is invalid or the gang is down. `affinity`: the prompt's `routing.affinity_key`, which
        the caller computed once to pick this gang too."""
        if self.broken is not None:
            raise Unavailable(f"the gang failed ({self.broken}); retry")
        # prefix affinity balanced against load: a shared long prefix finds the worker that cached it
        serving = [i for i in range(len(self.attention)) if i not in self.retired]
        if not serving:
            raise Unavailable("every attention worker of this gang is leaving; retry")
        worker = routing.pick(affinity, self.load, serving)
        stream = _Stream(request.params.n, worker)
        self._streams[request.request_id] = stream
        self.load[worker] += 1
        try:
            try:
                await self.attention[worker].submit.remote(request, self.consumer)
            except RayError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, EngineError):  # the typed error itself, not Ray's wrapper
                    stream.open_choices = 0  # the engine never took it: nothing to abort
                    if isinstance(cause, RankLeaving):
                        self.retired.add(worker)
                    raise cause from None
                raise Unavailable(f"attention worker {worker} is unreachable: {type(exc).__name__}") from None
            while stream.open_choices:
                batch = [await stream.queue.get()]
                while not stream.queue.empty():
                    batch.append(stream.queue.get_nowait())
                stream.open_choices -= sum(out.finished for out in batch)
                yield batch
        finally:
            self.load[worker] -= 1
            if self._streams.pop(request.request_id, None) is not None and stream.open_choices:
                self.abort_on(stream.worker, request.request_id)  # the consumer went away before the end

    def resize(self, attention: list, version: int) -> None:
        """The gang's attention ranks now: ranks added at the end get a channel (a slot a departed rank
        left is taken over); ranks past the new count take nothing new (their requests end with
        `RankLeaving` when the rank leaves)."""
        for i, handle in enumerate(attention):
            if i < len(self.attention) and i not in self.retired:
                continue
            if i < len(self.attention):
                self.retired.discard(i)
                self._listeners[i].cancel()
                self.attention[i], self._listeners[i] = handle, asyncio.create_task(self._listen(i))
            else:
                self.attention.append(handle)
                self.load.append(0)
                self._listeners.append(asyncio.create_task(self._listen(i)))
        self.retired |= set(range(len(attention), len(self.attention)))
        self.version = version

    def _retire(self, worker: int, reason: str) -> None:
        """`worker` left the gang, which serves on: its requests still open here end with `RankLeaving`
        (moved, planned), and the worker hears that this consumer moved them."""
        self.retired.add(worker)
        error = RankLeaving(f"attention worker {worker} left its gang ({reason}); moving on")
        for request_id, stream in self._streams.items():
            if stream.worker == worker:
                for index in sorted(stream.unfinished):
                    stream.put(RequestOutput(request_id, [], None, "error", error=error, index=index))
        self.attention[worker].moved_on.remote(self.consumer)

    def abort_on(self, worker: int, request_id: str) -> None:
        if not self.gang_failed:
            self.attention[worker].abort.remote(request_id)

    async def _listen(self, worker: int) -> None:
        try:
            channel = self.attention[worker].outputs.options(num_returns="streaming").remote(self.consumer)
            async for ref in channel:
                batch = await ref
                failed = next((o.error for o in batch if isinstance(o.error, Unavailable)), None)
                if isinstance(failed, RankLeaving):  # only this rank leaves: its requests move, the rest stay
                    for out in batch:
                        if out.request_id in self._streams:
                            self._streams[out.request_id].put(out)
                    self._retire(worker, failed.message)
                    return
                if failed is not None:  # the rank's collective failed (or its gang left): say so first
                    self._break(f"attention worker {worker}: {failed.message}", leaving=isinstance(failed, Draining))
                for out in batch:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
            if worker in self.retired:
                return
            reason = f"attention worker {worker} closed its channel"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Ray's wrapper of a death, the rank's own `Unavailable`, or a local failure
            if worker in self.retired:  # a rank that left the gang is gone: the gang serves on
                self._retire(worker, f"{type(exc).__name__}")
                return
            cause = getattr(exc, "cause", None) or exc
            if not isinstance(exc, WORKER_GONE) and not isinstance(cause, Unavailable):
                log.exception("the channel from attention worker %d failed in this process; the gang did not",
                              worker)
                self._break(f"attention worker {worker}'s channel failed here: {type(exc).__name__}", False)
                return
            reason = f"attention worker {worker}: {getattr(cause, 'message', None) or type(cause).__name__}"
        self._break(reason)

    def _break(self, reason: str, gang_failed: bool = True, leaving: bool = False) -> None:
        """`leaving`: the gang drains (scaled down): its requests end with `Draining`, a planned move."""
        if self.broken is not None:
            return
        self.broken, self.gang_failed = reason, gang_failed
        error = (Draining(f"the gang serving this request is leaving ({reason}); moving on") if leaving else
                 Unavailable(f"the gang serving this request failed ({reason}); retry" if gang_failed
                             else f"the connection to the gang failed ({reason}); retry"))
        for request_id, stream in self._streams.items():
            if stream.unfinished and not gang_failed:  # a live engine: it would run on for nobody
                self.attention[stream.worker].abort.remote(request_id)
            for index in sorted(stream.unfinished):
                stream.put(RequestOutput(request_id, [], None, "error", error=error, index=index))
        for task in self._listeners:
            if task is not asyncio.current_task():
                task.cancel()
        if leaving:  # the draining gang waits for this word before it stops its ranks
            for worker in self.attention:
                worker.moved_on.remote(self.consumer)
        if self.on_broken is not None:
            self.on_broken(reason, gang_failed)

    def close(self, reason: str = "the gang was stopped") -> None:
        """Stop listening; requests still open end with `Unavailable`."""
        self._break(reason)
