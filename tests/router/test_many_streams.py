"""64 streams at once, half over HTTP (the `openai` client, SSE) and half over gRPC (the committed
stubs), mixed `n`, stop strings, logprobs, greedy and seeded sampling, into one gang of 1 attention +
2 expert workers: every token arrives exactly once, in order, and each choice equals what the
engine gives in-process for the same request (tokens, text, finish reason, logprob values)."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.router.conftest import deploy
from tests.router.streams import assert_same, over_grpc, over_http, reference

STREAMS = 64
STOPS = [" the", "e ", "an", "\n"]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def live(local_ray, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("streams"), expert_workers=2, max_pending_requests=STREAMS)
    yield server


def _specs() -> list[dict]:
    rng = random.Random(7)
    specs = []
    for i in range(STREAMS):
        sampled = i % 3 == 2
        specs.append({
            "prompt": [rng.randrange(3, 2000) for _ in range(rng.randrange(3, 40))],
            "max_tokens": rng.randrange(6, 24), "n": rng.choice([1, 1, 2, 3]),
            "temperature": 0.8 if sampled else 0.0, "seed": 1000 + i if sampled else None,
            "stop": rng.sample(STOPS, 2) if i % 4 == 1 else [],
            "logprobs": 2 if i % 5 == 0 else None, "door": "grpc" if i % 2 else "http",
        })
    return specs


def test_64_concurrent_streams_each_token_once_and_as_in_process(live):
    specs = _specs()
    expected = reference(live.model_dir, specs)
    started = threading.Barrier(STREAMS, timeout=120)  # every stream is open before any is read to the end

    def run(spec):
        started.wait()
        return (over_grpc if spec["door"] == "grpc" else over_http)(live, spec)

    with ThreadPoolExecutor(STREAMS) as pool:
        got = list(pool.map(run, specs))

    assert sum(s["n"] for s in specs) > STREAMS and {s["door"] for s in specs} == {"http", "grpc"}
    assert_same(specs, expected, got)
    stopped = [c for spec, choices in zip(specs, expected) if spec["stop"] for c in choices]
    assert any(c["finish"] == "stop" for c in stopped)  # the stop strings were exercised
