"""`router.request_life` without Ray: whatever a request's path (answered, refused, failed with an error of
no type, cancelled, streamed to its end, left by its reader), it ends with exactly one outcome, and
only an admitted one is counted in flight until then."""

import asyncio
import gc

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import RequestMetrics
from router.request_life import Admission, Deadline
from workers.errors import DeadlineExceeded, InvalidRequest


def outcomes(metrics: RequestMetrics) -> tuple[float, dict[str, float]]:
    """(received, ended by outcome), from the replica's own exposition."""
    received, ended = 0.0, {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == "maverick_requests_received_total":
                received += s.value
            elif s.name == "maverick_requests_total":
                ended[s.labels["outcome"]] = ended.get(s.labels["outcome"], 0) + s.value
    return received, ended


@pytest.fixture
def admission():
    return Admission(RequestMetrics("tiny"), max_pending=1)


def refuse(exc: Exception) -> str:
    return f"refused: {type(exc).__name__}"


def run(admission: Admission, work) -> str:
    async def go():
        life = admission.open("Generate", "grpc")

        async def admitted():
            life.admit()
            return await work()

        return await life.run(admitted, refuse)

    return asyncio.run(go())


async def answer():
    return "answer"


async def untyped():
    raise RecursionError("an error of no type in our table")


async def invalid():
    raise InvalidRequest("a bad field")


def test_an_untyped_failure_ends_in_one_server_error_and_is_released(admission):
    assert run(admission, untyped) == "refused: RecursionError"
    assert outcomes(admission.metrics) == (1, {"server_error": 1})
    assert admission.in_flight == 0
    assert run(admission, answer) == "answer"  # its place was given back
    assert outcomes(admission.metrics) == (2, {"server_error": 1, "ok": 1})


def test_a_typed_refusal_and_a_full_queue_each_end_once(admission):
    assert run(admission, invalid) == "refused: InvalidRequest"

    async def second_while_first_runs():
        first = admission.open("Generate", "grpc")
        first.admit()
        second = admission.open("Generate", "grpc")

        async def work():
            second.admit()
            return "served"

        refused = await second.run(work, refuse)
        first.outcome = "ok"
        first.close()
        return refused

    assert asyncio.run(second_while_first_runs()) == "refused: QueueFull"
    assert outcomes(admission.metrics) == (3, {"client_error": 1, "rejected": 1, "ok": 1})
    assert admission.in_flight == 0


def test_a_cancelled_request_is_aborted(admission):
    async def go():
        life = admission.open("Generate", "grpc")

        async def admitted():
            life.admit()
            await asyncio.sleep(60)

        task = asyncio.create_task(life.run(admitted, refuse))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert outcomes(admission.metrics) == (1, {"aborted": 1})
    assert admission.in_flight == 0


def stream_life(admission, items, ended=None, refuse_stream=None):
    """A life whose answer is a stream of `items` carried to its end."""
    life = admission.open("/v1/completions", "http")

    async def body():
        with life.carry(ended=ended, refuse=refuse_stream):
            async for item in items:
                yield item

    async def work():
        life.admit()
        return life.hand_on(body())

    return life, work


async def numbers(n, then=None):
    for i in range(n):
        yield i
    if then is not None:
        raise then


def test_a_stream_ends_once_at_its_end_with_what_it_says(admission):
    async def go():
        life, work = stream_life(admission, numbers(3), ended=lambda: "timeout")
        stream = await life.run(work, refuse)
        assert admission.in_flight == 1  # the stream holds its place until it ends
        return [i async for i in stream]

    assert asyncio.run(go()) == [0, 1, 2]
    assert outcomes(admission.metrics) == (1, {"timeout": 1})
    assert admission.in_flight == 0


def test_a_stream_that_raises_untyped_ends_once_and_refuses(admission):
    class Rejected(Exception):
        pass

    def refuse_stream(exc):
        raise Rejected() from None

    async def go():
        life, work = stream_life(admission, numbers(2, then=KeyError("x")), refuse_stream=refuse_stream)
        stream = await life.run(work, refuse)
        got = []
        with pytest.raises(Rejected):
            async for i in stream:
                got.append(i)
        return got

    assert asyncio.run(go()) == [0, 1]
    assert outcomes(admission.metrics) == (1, {"server_error": 1})


def test_a_stream_left_by_its_reader_is_aborted_started_or_not(admission):
    async def go():
        life, work = stream_life(admission, numbers(5))
        stream = await life.run(work, refuse)
        assert await anext(stream) == 0
        await stream.aclose()  # the reader went away mid-stream
        life, work = stream_life(admission, numbers(5))
        await life.run(work, refuse)  # the response is dropped before its body starts

    asyncio.run(go())
    gc.collect()
    assert outcomes(admission.metrics) == (2, {"aborted": 2})
    assert admission.in_flight == 0


def test_the_deadline_error_is_the_table_s_504():
    async def go():
        async def slow():
            await asyncio.sleep(60)
            yield 1

        deadline = Deadline(0.05)
        with pytest.raises(DeadlineExceeded, match="within 0.05s"):
            await deadline.next(slow())
        with pytest.raises(DeadlineExceeded):
            async with Deadline(0.05).bound():
                await asyncio.sleep(60)
        assert await Deadline(5).next(numbers(1)) == 0

    asyncio.run(go())
