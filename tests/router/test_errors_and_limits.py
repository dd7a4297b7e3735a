"""The error table, auth on every route, overload, deadlines and a failing gang, over real HTTP.

One deployment (no expert workers) with an API key, 3 requests admitted at a time and a 4 s request
timeout; every bad request gets exactly its status, never a 5xx, and the next good request is served.
"""

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from cluster.probe import wait_until

from tests.router.conftest import deploy

pytestmark = pytest.mark.timeout(600)

KEY = "sk-test-key"
GOOD = {"model": "tiny", "prompt": [2016, 5, 6], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def live(local_ray, tmp_path_factory):
    # migration off: a request on a failed gang ends with 503 at once instead of waiting (up to its
    # 4 s deadline) for the rebuilt gang, which could then already serve the next request
    server = deploy(tmp_path_factory.mktemp("limits"), api_key=KEY, max_pending_requests=3, request_timeout_s=4,
                    max_body_bytes=65536, migration_limit=0)
    yield server


def call(live, path, body=None, key=KEY, method=None, raw: bytes | None = None):
    """(status, headers, parsed body) of one HTTP request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(live.url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            return r.status, dict(r.headers), text
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        return e.code, dict(e.headers), json.loads(text) if text.startswith("{") else text


def cmpl(**fields):
    return ("/v1/completions", {**GOOD, **fields})


def chat(**fields):
    return ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 3, **fields})


BAD = [
    ("temperature<0", *cmpl(temperature=-1), 400),
    ("temperature str", *cmpl(temperature="hot"), 400),
    ("top_p=0", *cmpl(top_p=0), 400),
    ("top_p>1", *cmpl(top_p=1.5), 400),
    ("top_k<-1", *cmpl(top_k=-2), 400),
    ("min_p>1", *cmpl(min_p=2), 400),
    ("n=0", *cmpl(n=0), 400),
    ("n huge", *cmpl(n=100000), 400),
    ("max_tokens=0", *cmpl(max_tokens=0), 400),
    ("max_tokens str", *cmpl(max_tokens="ten"), 400),
    ("presence>2", *cmpl(presence_penalty=3), 400),
    ("frequency<-2", *cmpl(frequency_penalty=-3), 400),
    ("repetition=0", *cmpl(repetition_penalty=0), 400),
    ("logprobs>20", *cmpl(logprobs=50), 400),
    ("logit_bias key", *cmpl(logit_bias={"abc": 1}), 400),
    ("logit_bias oov", *cmpl(logit_bias={"99999": 1}), 400),
    ("logit_bias value", *cmpl(logit_bias={"5": 500}), 400),
    ("stop int", *cmpl(stop=5), 400),
    ("stop empty", *cmpl(stop=[""]), 400),
    ("stop_token_ids<0", *cmpl(stop_token_ids=[-1]), 400),
    ("seed str", *cmpl(seed="x"), 400),
    ("prompt empty", *cmpl(prompt=""), 400),
    ("prompt []", *cmpl(prompt=[]), 400),
    ("prompt oov", *cmpl(prompt=[99999]), 400),
    ("prompt negative", *cmpl(prompt=[-1]), 400),
    ("prompt missing", "/v1/completions", {"model": "tiny", "max_tokens": 3}, 400),
    ("over context", *cmpl(max_tokens=10**6), 400),
    ("over context stream", *cmpl(max_tokens=10**6, stream=True), 400),
    ("unknown model", *cmpl(model="nope"), 404),
    ("suffix", *cmpl(suffix="x"), 400),
    ("best_of", *cmpl(best_of=2), 400),
    ("stream_options without stream", *cmpl(stream_options={"include_usage": True}), 400),
    ("messages empty", *chat(messages=[]), 400),
    ("messages missing", "/v1/chat/completions", {"model": "tiny"}, 400),
    ("bad role", *chat(messages=[{"role": "robot", "content": "x"}]), 400),
    ("image part", *chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400),
    ("tool name", *chat(tools=[{"type": "function", "function": {"name": "no spaces"}}]), 400),
    ("tool_choice unknown", *chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                  tool_choice={"type": "function", "function": {"name": "g"}}), 400),
    ("response_format type", *chat(response_format={"type": "xml"}), 400),
    ("json schema not an object", *chat(response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": [1]}}), 400),
    ("guided_json", *cmpl(guided_json={"type": "object"}), 400),
    ("json schema nested too deeply", *chat(response_format={"type": "json_schema",
                                                             "json_schema": {"name": "x", "schema": "[" * 5000}}), 400),
    ("structured json nested too deeply", *cmpl(structured_outputs={"json": "[" * 5000}), 400),
    ("top_logprobs without logprobs", *chat(top_logprobs=2), 400),
    ("chat unknown model", *chat(model="nope"), 404),
    ("tokenize both", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400),
    ("detokenize oov", "/detokenize", {"tokens": [99999]}, 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_its_status_and_the_next_is_served(live, name, path, body, status):
    got, headers, payload = call(live, path, body)
    assert got == status, payload
    error = payload["error"]
    assert error["code"] == status and error["message"] and error["request_id"]
    assert "Traceback" not in json.dumps(payload)
    if status == 404:  # a wrong model name: the answer names the one served
        assert "Served models: `tiny`" in error["message"], error
    if "nested too deeply" in name:  # one clean line, not Python's RecursionError
        assert error["message"].endswith(": the JSON schema is nested too deeply"), error
        assert error["type"] == "invalid_request_error", error
    assert call(live, *cmpl())[0] == 200


@pytest.mark.parametrize("raw,status", [(b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400),
                                        (b'{"prompt": [' + b"1" * 5000 + b"]}", 400),
                                        (b'{"prompt": "' + b"a" * 70000 + b'"}', 413)],
                         ids=["bad json", "array", "not utf8", "a number past Python's 4300 digits", "oversized"])
def test_malformed_bodies(live, raw, status):
    got, _, payload = call(live, "/v1/completions", raw=raw)
    assert got == status and payload["error"]["code"] == status
    assert call(live, *cmpl())[0] == 200


def test_a_prompt_that_cannot_fit_is_refused_from_its_length(live):
    """Text longer than the room left could hold even at the longest token's characters per token is
    refused before it is tokenized (a 1 MB body costs nothing beside the engine); ids before they are
    shipped to a gang; text that fits is tokenized and served as before."""
    text = "word " * 1840  # 9200 characters; 4096 - 4000 leaves room for 96 tokens of at most 95 characters
    for (path, body), param in ((cmpl(prompt=text, max_tokens=4000), "prompt"),
                                (chat(messages=[{"role": "user", "content": text}], max_tokens=4000), "messages")):
        status, _, payload = call(live, path, body)
        assert status == 400, payload
        assert "characters, more than 96 tokens can hold" in payload["error"]["message"], payload
        assert payload["error"]["param"] == param
    status, _, payload = call(live, *cmpl(prompt=[5] * 5000))
    assert status == 400 and "maximum context length is 4096 tokens" in payload["error"]["message"], payload
    assert call(live, *cmpl(prompt="word " * 10))[0] == 200


def prompt_tokens_counted(live) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, text = call(live, "/metrics")
    assert status == 200
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "maverick_prompt_tokens_total")


def test_prompt_tokens_count_only_prompts_the_engine_took(live):
    """As vLLM's prompt_tokens: a request the engine refuses with 400 processed no prompt."""
    before = prompt_tokens_counted(live)
    for fields in ({"prompt": [2016, 5, 99999]}, {"prompt": [2016, 5, 6, 7], "max_tokens": 10**6},
                   {"prompt": [2016, 5, 6, 7], "max_tokens": 10**6, "stream": True}):
        assert call(live, *cmpl(**fields))[0] == 400
    assert prompt_tokens_counted(live) == before
    assert call(live, *cmpl(prompt=[2016, 5, 6, 7]))[0] == 200
    assert prompt_tokens_counted(live) == before + 4


def test_every_route_needs_the_key_except_health(live):
    from ray import serve

    from router.http_guard import OPEN_PATHS

    live_routes = serve.get_app_handle("maverick").routes.remote().result()
    routes = [(path, m) for path, methods in live_routes for m in methods if m != "HEAD"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"} <= {p for p, _ in routes}
    for path, method in routes:
        body = {} if method == "POST" else None
        for key in (None, "wrong-key"):
            status, _, payload = call(live, path, body, key=key, method=method)
            if path in OPEN_PATHS:
                assert status == 200, (path, payload)
            else:
                assert status == 401, (path, method, key, payload)
                assert payload["error"]["type"] == "authentication_error"
        assert call(live, path, body, method=method)[0] != 401
    assert call(live, "/no/such/route", {}, key=None)[0] == 401  # unknown routes reveal nothing without a key
    assert call(live, "/no/such/route", {})[0] == 404


def test_top_against_a_keyed_server_asks_for_the_key_in_one_line(live):
    import subprocess
    import sys
    from pathlib import Path

    top = [str(Path(sys.executable).with_name("maverick")), "top", "--url", live.url, "--once", "--interval", "0.1"]
    env = {k: v for k, v in os.environ.items() if k != "MAVERICK_API_KEY"}
    refused = subprocess.run(top, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "401" in refused.stderr and "--api-key" in refused.stderr
    allowed = subprocess.run(top + ["--api-key", KEY], capture_output=True, text=True, timeout=60, env=env)
    assert allowed.returncode == 0 and "gang-" in allowed.stdout, allowed.stderr


def test_overload_gives_429_with_retry_after_and_loses_nothing(live):
    results = []

    def one(i):
        body = {**GOOD, "prompt": [2016, 100 + i, 7], "max_tokens": 120, "ignore_eos": True}
        results.append(call(live, "/v1/completions", body))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and statuses.count(200) >= 3, statuses
    for status, headers, payload in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and payload["error"]["type"] == "rate_limit_error"
        else:
            done = json.loads(payload)
            assert done["choices"][0]["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 120


def test_deadline_gives_504_and_frees_the_engine(live):
    from ray import serve

    long = {**GOOD, "max_tokens": 4000, "ignore_eos": True}
    status, _, payload = call(live, "/v1/completions", long)
    assert status == 504 and payload["error"]["type"] == "timeout", payload
    client = openai.OpenAI(base_url=live.v1, api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.APIError, match="did not finish"):
        for _ in client.completions.create(stream=True, **{k: v for k, v in long.items() if k != "ignore_eos"},
                                           extra_body={"ignore_eos": True}):
            pass
    gang = serve.get_deployment_handle("gangs", "maverick")
    deadline = time.monotonic() + 10
    while gang.stats.remote().result()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gang.stats.remote().result()["in_flight"] == 0


def _attention_worker_pid() -> int:
    from ray._private import state

    alive = [a for a in state.actors().values() if a["ActorClassName"] == "AttentionWorker" and a["State"] == "ALIVE"]
    assert len(alive) == 1, alive
    return alive[0]["Pid"]


def test_failed_gang_gives_503_and_readiness_false_until_rebuilt(live):
    client = openai.OpenAI(base_url=live.v1, api_key=KEY, max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt=[2016, 9, 9], max_tokens=3000, stream=True,
                                       temperature=0, extra_body={"ignore_eos": True})
    next(iter(stream))
    os.kill(_attention_worker_pid(), signal.SIGKILL)
    with pytest.raises(openai.APIError) as failure:  # the in-flight request ends with the unavailable error
        for _ in stream:
            pass
    assert "the gang serving this request failed" in str(failure.value), failure.value
    status, headers, payload = call(live, *cmpl())
    assert status == 503 and int(headers["retry-after"]) >= 1, payload
    ready_status = call(live, "/health/ready", key=None)[0]
    assert ready_status == 503
    wait_until(lambda: call(live, "/health/ready", key=None)[0] == 200, 120, "the gang rebuilt")
    assert call(live, *cmpl())[0] == 200
