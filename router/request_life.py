"""A generation request's life at either door (HTTP in `router.ingress`, gRPC in `router.grpc_service`):
counted as received, admitted or refused, run within the server-side deadline, and ended with exactly
one outcome whatever the path (an error, a cancel, a stream the client leaves), so that
`received == sum(outcomes)` (`router.metrics`).

Each door says only how it parses a request and how it answers an error; the rest is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from router.metrics import RequestMetrics, Ticket, outcome_of
from workers.errors import DeadlineExceeded, QueueFull, Unavailable

T = TypeVar("T")


class Deadline:
    """The server-side deadline of one request, `timeout_s` from now; the one place its error is made."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.at = asyncio.get_running_loop().time() + timeout_s

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request did not finish within {self.timeout_s:g}s")

    async def next(self, iterator: AsyncIterator[T]) -> T | None:
        """The iterator's next item (None at its end), or DeadlineExceeded. Only the wait is timed,
        never the consumer's work between items (a stream's client reading slowly)."""
        try:
            async with asyncio.timeout_at(self.at):
                return await anext(iterator, None)
        except TimeoutError:
            raise self.error() from None

    @contextlib.asynccontextmanager
    async def bound(self):
        """The whole block within the deadline (one timer, where no client reads in between)."""
        try:
            async with asyncio.timeout_at(self.at):
                yield
        except TimeoutError:
            raise self.error() from None


class Admission:
    """This replica's generation requests: how many are admitted and not yet ended (at most
    `max_pending`, beyond that 429), and whether it drains (then 503)."""

    def __init__(self, metrics: RequestMetrics, max_pending: int):
        self.metrics, self.max_pending = metrics, max_pending
        self.in_flight = 0
        self.draining = False

    def open(self, route: str, protocol: str) -> RequestLife:
        """A request arrived: counted as received now."""
        return RequestLife(self, self.metrics.ticket(route, protocol, self._release))

    def drain(self) -> int:
        """Refuse new requests from now on; returns how many are still in flight."""
        self.draining = True
        return self.in_flight

    def _admit(self, ticket: Ticket) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.in_flight >= self.max_pending:
            raise QueueFull(f"too many requests in flight ({self.in_flight}); retry later")
        self.in_flight += 1
        ticket.admitted = True
        self.metrics.set_in_flight(self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        self.metrics.set_in_flight(self.in_flight)


class RequestLife:
    """One request from arrival to its one outcome. `run` covers the part before the answer; a stream
    that the answer hands on (`hand_on`) carries the outcome to its end (`carry`)."""

    def __init__(self, admission: Admission, ticket: Ticket):
        self._admission, self._ticket = admission, ticket
        self.outcome = "server_error"  # recorded at the end unless a path says otherwise
        self._handed_on = False  # a stream now owns the outcome

    def admit(self) -> None:
        """Counted in flight until the end; QueueFull or Unavailable if this replica cannot take it."""
        self._admission._admit(self._ticket)

    def close(self) -> None:
        """Ends the request with `self.outcome`; only the first call counts."""
        self._ticket.close(self.outcome)

    async def run(self, work: Callable[[], Awaitable[T]], refuse: Callable[[Exception], T]) -> T:
        """`await work()` (which admits), or `refuse(exc)` for its error: the door's answer. The request
        ends here with "ok", the error's outcome or "aborted" (the client went away), unless `work`
        handed a stream on."""
        try:
            result = await work()
            if not self._handed_on:
                self.outcome = "ok"
            return result
        except asyncio.CancelledError:
            self.outcome = "aborted"
            raise
        except Exception as exc:  # the table's errors, and anything untyped (a 500, INTERNAL)
            self.outcome = outcome_of(exc)
            return refuse(exc)
        finally:
            if not self._handed_on:
                self.close()

    def hand_on(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """`stream` (whose body is in `carry`) ends the request from now on; a reader gone before its
        first item, so that its body never runs, ends it as "aborted"."""
        self._handed_on = True
        self.outcome = "aborted"
        weakref.finalize(stream, self.close)
        return stream

    @contextlib.contextmanager
    def carry(self, ended: Callable[[], str] | None = None, refuse: Callable[[Exception], None] | None = None):
        """Around a stream's body: the request ends as "aborted" if the reader leaves first, with
        `ended()` at the body's end (else as `outcome` says then: the body may set it), or with the
        error's outcome if it raises (then `refuse(exc)`, which raises the door's answer)."""
        self._handed_on = True
        self.outcome = "aborted"
        try:
            yield self
            if ended is not None:
                self.outcome = ended()
        except Exception as exc:
            self.outcome = outcome_of(exc)
            if refuse is None:
                raise
            refuse(exc)
        finally:
            self.close()
