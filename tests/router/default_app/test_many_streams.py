"""64 streams at once, half over HTTP (the `openai` client, SSE) and half over gRPC (the committed
stubs), mixed `n`, stop strings, logprobs, greedy and seeded sampling, into one gang of 1 attention +
2 expert workers: every token arrives exactly once, in order, and each choice equals what the
engine gives in-process for the same request (tokens, text, finish reason, logprob values)."""

import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.router.streams import assert_same, over_grpc, over_http, reference

STREAMS = 64
STOPS = [" the", "e ", "an", "\n"]
pytestmark = pytest.mark.timeout(900)


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


def test_streams_flow_while_a_large_body_is_parsed_and_tokenized(live):
    """A 3.5 MB text (a prompt, then a chat message) takes the replica ~2 s to tokenize through
    /tokenize, which counts any text; a stream on the same replica must keep receiving tokens
    meanwhile. Judged against the big request's own time, so a slower machine stretches both: its
    longest silence must stay well under that time (before tokenizing left the event loop, it was
    nearly all of it). The same text as a completion or a chat is refused before it is tokenized (it
    cannot fit the context at any length per token), in a fraction of that time."""
    rng = random.Random(3)
    text = " ".join(rng.choice(["serving", "maverick", "tokens", "flow", "the", "of"]) for _ in range(520_000))
    chat = [{"role": "user", "content": text}]
    bigs = [("/tokenize", {"model": "tiny", "prompt": text}, 200),
            ("/tokenize", {"model": "tiny", "messages": chat}, 200),
            ("/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 4}, 400),
            ("/v1/chat/completions", {"model": "tiny", "messages": chat, "max_tokens": 4}, 400)]
    arrivals: list[float] = []
    done = threading.Event()

    def stream() -> None:
        body = {"prompt": [2016, 5, 6], "max_tokens": 4000, "ignore_eos": True, "temperature": 0, "stream": True}
        req = urllib.request.Request(live.url + "/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    arrivals.append(time.monotonic())
                if done.is_set():
                    return  # the client goes away: the request is aborted

    def send(path: str, data: bytes) -> int:
        req = urllib.request.Request(live.url + path, data, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as e:
            e.read()
            return e.code

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    took = {}
    try:
        for path, body, status in bigs:
            data = json.dumps(body).encode()
            assert 3_000_000 < len(data) < 4 * 2**20  # under the body limit
            seen = len(arrivals)
            deadline = time.monotonic() + 120
            while len(arrivals) < seen + 5 and time.monotonic() < deadline:  # the stream is flowing
                time.sleep(0.05)
            assert len(arrivals) >= seen + 5 and reader.is_alive()
            start = time.monotonic()
            assert send(path, data) == status, path
            end = time.monotonic()
            took[status] = max(took.get(status, 0.0), end - start)
            if status == 200:  # tokenized: the stream must flow through it
                points = [start] + [t for t in list(arrivals) if start < t < end] + [end]
                silence = max(b - a for a, b in zip(points, points[1:]))
                print(f"\n{path}: {len(points) - 2} tokens in {end - start:.2f}s, longest silence {silence:.2f}s")
                assert silence < (end - start) / 3, f"{path}: no token for {silence:.2f}s of {end - start:.2f}s"
        assert took[400] < took[200] / 3, took  # refused from its length, never tokenized
    finally:
        done.set()
        reader.join(timeout=120)
