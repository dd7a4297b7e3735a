"""The chain of attempts in `router.resume`, driven by attempts that fail the way a gang does (an
`Unavailable` output after some tokens, or a submit refused): what each retry carries, when it gives
up, what it counts. The live cases (real processes killed) are in test_chaos.py."""

import asyncio

import pytest

from cluster.gang_pool import NoReadyGang
from router.resume import ResumeStats, resumable
from workers.errors import Draining, InvalidRequest, Unavailable
from workers.protocol import GenerateRequest, RequestOutput
from workers.sampling_params import SamplingParams


def failing_gang(tokens_before_failure: int, finished: set[int] | None = None):
    """Attempts that each deliver `tokens_before_failure` tokens per open choice, then fail; the
    requests they were given, in order."""
    seen: list[tuple[GenerateRequest, bool]] = []

    async def attempt(request: GenerateRequest, retry: bool):
        seen.append((request, retry))
        open_choices = sorted(request.resume) if request.resume else range(request.params.n)
        for step in range(tokens_before_failure):
            batch = []
            for c in open_choices:
                done = len((request.resume or {}).get(c, [])) + step
                last = finished and c in finished and step == tokens_before_failure - 1
                batch.append(RequestOutput(request.request_id, [100 * c + done], finish_reason="stop" if last else None,
                                           index=c))
            yield batch
        yield [RequestOutput(request.request_id, [], None, "error", error=Unavailable("rank died"), index=c)
               for c in open_choices if not (finished and c in finished)]

    return attempt, seen


async def drain(stream) -> list[RequestOutput]:
    return [out async for batch in stream for out in batch]


def test_each_retry_carries_what_each_open_choice_delivered_then_it_gives_up():
    attempt, seen = failing_gang(2, finished={1})
    stats = ResumeStats()
    request = GenerateRequest([5, 6], SamplingParams(n=2, max_tokens=50, prompt_logprobs=1), "r")
    got = []

    async def run():
        async for batch in resumable(request, attempt, 2, stats):
            got.extend(batch)

    with pytest.raises(Unavailable, match="gave up after 2 move"):
        asyncio.run(run())
    assert [retry for _, retry in seen] == [False, True, True]
    assert seen[1][0].resume == {0: [0, 1]} and seen[2][0].resume == {0: [0, 1, 2, 3]}
    assert [r.request_id for r, _ in seen] == ["r", "r~1", "r~2"]
    assert seen[1][0].params.prompt_logprobs is None  # choice 0's first output carried them already
    assert [o.new_token_ids[0] for o in got if o.index == 0] == [0, 1, 2, 3, 4, 5]  # each token once
    assert [o.new_token_ids[0] for o in got if o.index == 1] == [100, 101]
    assert stats.resumed_requests == 1 and stats.migrations == 2 and stats.gave_up == 1


def test_no_ready_gang_for_a_new_request_is_503_at_once():
    async def attempt(request, retry):
        raise NoReadyGang("no gang")
        yield  # an async generator

    with pytest.raises(NoReadyGang):
        asyncio.run(drain(resumable(GenerateRequest([1]), attempt, 3, ResumeStats())))


def test_errors_of_the_request_itself_are_not_retried():
    calls = []

    async def attempt(request, retry):
        calls.append(request)
        raise InvalidRequest("bad field")
        yield

    with pytest.raises(InvalidRequest):
        asyncio.run(drain(resumable(GenerateRequest([1]), attempt, 3, ResumeStats())))
    assert len(calls) == 1


def test_moves_off_a_leaving_gang_are_planned_and_do_not_count_against_the_limit():
    """A gang being scaled down ends its requests with `Draining`: with migration_limit 0 (failures
    end a request) they still move, each token once; a failure after them still counts."""
    tokens = 2
    failures = [Draining("leaving"), Draining("leaving"), Unavailable("rank died")]
    seen = []

    async def attempt(request, retry):
        seen.append((request, retry))
        done = len((request.resume or {}).get(0, []))
        for step in range(tokens):
            yield [RequestOutput(request.request_id, [done + step], index=0)]
        yield [RequestOutput(request.request_id, [], None, "error", error=failures[len(seen) - 1], index=0)]

    stats = ResumeStats()
    got = []

    async def run():
        async for batch in resumable(GenerateRequest([5], SamplingParams(max_tokens=50), "r"), attempt, 0, stats):
            got.extend(batch)

    with pytest.raises(Unavailable, match="gave up after 0 move"):
        asyncio.run(run())
    assert [retry for _, retry in seen] == [False, True, True]
    assert [o.new_token_ids[0] for o in got] == [0, 1, 2, 3, 4, 5]
    assert stats.planned_moves == 2 and stats.resumed_requests == 1 and stats.gave_up == 1
