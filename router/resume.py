"""Requests that outlive their gang: when the gang serving a request fails, the request moves on.

The stream a client reads is a chain of attempts. Each attempt runs the request on one gang; this
module remembers, per choice, the tokens already passed to the client. When an attempt fails with
`Unavailable` (a rank died, a collective timed out, the gang was torn down), the request is sent
again as prompt + those tokens (`GenerateRequest.resume`) to a ready gang: another one at once, or
the same one once rebuilt. The engine then continues each open choice exactly where it stopped
(penalties, stop strings, text, seeded draws), so the client sees a pause, then the next token: none
lost, none repeated. Waiting for a gang is bounded only by the request's own timeout (the caller's
deadline: 504); after `limit` moves the request ends with 503. A move off a gang that is leaving
(`Draining`: scaled down, redeployed) is planned, not a failure: it does not count against `limit`
(at most `PLANNED_MOVES` of them, so a request cannot chase leaving gangs forever).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from cluster.gang_pool import NoReadyGang
from router import prompt_logprobs
from workers.errors import Draining, Unavailable
from workers.protocol import GenerateRequest, RequestOutput

log = logging.getLogger(__name__)

PLANNED_MOVES = 16
# (request, is a retry) -> the attempt's output batches; a retry waits for a ready gang (`GangPool.stream`)
Attempt = Callable[[GenerateRequest, bool], AsyncIterator[list[RequestOutput]]]


@dataclass
class ResumeStats:
    resumed_requests: int = 0  # requests moved at least once
    migrations: int = 0  # moves, all requests together
    planned_moves: int = 0  # of those, off a leaving gang (`Draining`)
    gave_up: int = 0  # requests that failed after `limit` moves
    last_pause_s: float = 0.0  # the last move: from the failure seen to the next token delivered
    max_pause_s: float = 0.0


async def resumable(request: GenerateRequest, attempt: Attempt, limit: int,
                    stats: ResumeStats) -> AsyncIterator[list[RequestOutput]]:
    """The request's output batches across as many gangs as it takes (at most `limit` moves)."""
    delivered: dict[int, list[int]] = {i: [] for i in range(request.params.n)}  # open choices only
    current, moves, planned, failed_at = request, 0, 0, None
    while True:
        failure = None
        batches = attempt(current, moves + planned > 0)
        try:
            async for batch in batches:
                good = []
                for out in batch:
                    if isinstance(out.error, Unavailable):
                        failure = out.error
                    else:
                        good.append(out)
                        _note(delivered, out)
                if good:
                    if failed_at is not None:
                        _pause_ended(stats, time.monotonic() - failed_at)
                        failed_at = None
                    yield good
                if failure is not None:
                    break
        except Unavailable as exc:  # the gang was already failing when this attempt began
            if moves + planned == 0 and isinstance(exc, NoReadyGang):
                raise
            failure = exc
        finally:
            await batches.aclose()
        if failure is None or not delivered:
            return
        failed_at = failed_at or time.monotonic()
        if moves + planned == 0:
            stats.resumed_requests += 1
        if isinstance(failure, Draining) and planned < PLANNED_MOVES:
            planned += 1
            stats.planned_moves += 1
        else:
            moves += 1
        if moves > limit:
            stats.gave_up += 1
            raise Unavailable(f"{failure.message}; the request gave up after {limit} move(s) to another gang")
        stats.migrations += 1
        log.warning("request %s: %s; resuming %d choice(s) elsewhere (move %d of %d%s)", request.request_id,
                    failure.message, len(delivered), moves, limit, f", {planned} planned" if planned else "")
        current = resumed(request, delivered, moves + planned)


def _note(delivered: dict[int, list[int]], out: RequestOutput) -> None:
    tokens = delivered.get(out.index)
    if tokens is None:
        return
    if out.finished:
        del delivered[out.index]
    else:
        tokens.extend(out.new_token_ids)


def _pause_ended(stats: ResumeStats, pause_s: float) -> None:
    stats.last_pause_s = pause_s
    stats.max_pause_s = max(stats.max_pause_s, pause_s)


def resumed(request: GenerateRequest, delivered: dict[int, list[int]], move: int) -> GenerateRequest:
    """The request again, as its open choices left it. Prompt logprobs that went out already need not be
    computed again (and the new gang may then use its prefix cache)."""
    params = request.params
    if params.prompt_logprobs is not None and prompt_logprobs.already_sent(delivered):
        params = dataclasses.replace(params, prompt_logprobs=None)
    return GenerateRequest(request.prompt_token_ids, params, f"{request.request_id}~{move}",
                           resume={i: list(tokens) for i, tokens in delivered.items()})
