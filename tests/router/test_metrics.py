"""Metrics proven on a real Prometheus (Debian's `prometheus`, started here on 127.0.0.1).

A live deployment (1 attention + 2 expert workers rebalancing their experts, an API key, 3 requests
admitted at a time) takes
load the client tallies itself: good requests over HTTP and gRPC, bad ones, a client that goes away,
429s and a gang whose expert worker is killed. Prometheus scrapes Ray's metrics agents through Ray's
service-discovery file and the serving port's `/metrics` with the key; then every query of every
dashboard panel must return data, and the counts must equal what the client saw.
"""

import collections
import json
import os
import signal
import threading
import urllib.error
import urllib.request

import grpc
import pytest

from cluster import dashboards
from cluster.probe import wait_until
from router import maverick_v1_pb2 as pb
from router import maverick_v1_pb2_grpc as pb_grpc
from tests.router import conftest

pytestmark = pytest.mark.timeout(900)
KEY = "sk-metrics"
APP = "metrics"
PREFIX = [2016] + list(range(300, 379))  # 80 tokens: later requests hit its cached blocks


@pytest.fixture(scope="module")
def live(ray_with_metrics, tmp_path_factory):
    server = conftest.deploy(tmp_path_factory.mktemp("metrics"), name=APP, route_prefix="/", api_key=KEY,
                             expert_workers=2, max_pending_requests=3, request_timeout_s=120,
                             migration_limit=0,  # a gang failure ends its requests with 503 (counted here)
                             eplb={"redundant_experts": 1, "rebalance_every_steps": 8})  # its panels get data
    yield server


class Tally:
    """What the client saw: outcomes, tokens received, engine requests that got a first token."""

    def __init__(self):
        self.outcomes = collections.Counter()
        self.tokens = 0
        self.first_tokens = 0
        self.lock = threading.Lock()

    def add(self, status: int, tokens: int = 0) -> None:
        outcome = {200: "ok", 429: "rejected", 503: "unavailable", 504: "timeout"}.get(
            status, "client_error" if status < 500 else "server_error")
        with self.lock:
            self.outcomes[outcome] += 1
            self.tokens += tokens
            self.first_tokens += tokens > 0


def headers(key=KEY):
    out = {"content-type": "application/json"}
    if key:
        out["authorization"] = f"Bearer {key}"
    return out


def post(live, tally: Tally, path: str, body: dict, key=KEY) -> int:
    """A non-streaming request; the tokens counted from `return_token_ids`."""
    req = urllib.request.Request(live.url + path, json.dumps({**body, "return_token_ids": True}).encode(),
                                 headers(key))
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
            tally.add(r.status, sum(len(c["token_ids"]) for c in out["choices"]))
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        tally.add(e.code)
        return e.code


def stream(live, tally: Tally, path: str, body: dict, on_first=None, stop_after_first=False) -> int | None:
    """A streaming request; the status is that of a final error event, if one came. With
    `stop_after_first`, the client goes away after the first token (tallied as aborted by the caller)."""
    req = urllib.request.Request(live.url + path, json.dumps({**body, "stream": True,
                                                              "return_token_ids": True}).encode(), headers())
    tokens, status = 0, 200
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    status = event["error"]["code"]
                    continue
                for choice in event.get("choices", []):
                    tokens += len(choice.get("token_ids") or [])
                if tokens and on_first is not None:
                    on_first()
                    on_first = None
                if tokens and stop_after_first:
                    return None  # the with-block closes the connection: the server sees the client leave
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    tally.add(status, tokens)
    return status


def grpc_calls(live, tally: Tally) -> None:
    channel = grpc.insecure_channel(live.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = pb_grpc.GenerationStub(channel)
    md = [("application", APP), ("authorization", f"Bearer {KEY}")]
    for i in range(2):
        out = stub.Generate(pb.GenerateRequest(prompt_token_ids=[2016, 40 + i, 41], max_tokens=12,
                                               temperature=0.0), metadata=md, timeout=120)
        tally.add(200, len(out.choices[0].token_ids))
        tokens = sum(len(m.choices[0].token_ids) for m in stub.GenerateStream(
            pb.GenerateRequest(prompt_token_ids=[2016, 50 + i], max_tokens=12, temperature=0.0),
            metadata=md, timeout=120))
        tally.add(200, tokens)
    with pytest.raises(grpc.RpcError) as err:  # an empty prompt: INVALID_ARGUMENT, a client error
        stub.Generate(pb.GenerateRequest(prompt_token_ids=[], max_tokens=4), metadata=md, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    tally.add(400)
    channel.close()


def ingress_metrics(live) -> dict[str, float]:
    """The serving port's /metrics, summed per metric name (prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(live.url + "/metrics", headers=headers())
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    sums: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name if "outcome" not in sample.labels else f"{sample.name}:{sample.labels['outcome']}"
            sums[key] += sample.value
    return sums


def gang_pids() -> list[int]:
    from ray import serve

    stats = serve.get_deployment_handle("gangs", APP).stats.remote().result()
    return [r["pid"] for r in stats["ranks"]]


def drive_load(live) -> tuple[Tally, float]:
    """All the traffic; returns the client's tally and the tokens the server produced for the request
    whose client went away (counted by the server, not received)."""
    tally = Tally()
    good = {"model": "tiny", "max_tokens": 16, "temperature": 0}
    for i in range(3):
        post(live, tally, "/v1/completions", {**good, "prompt": [2016, 7 + i, 8, 9]})
        stream(live, tally, "/v1/completions", {**good, "prompt": [2016, 17 + i, 18]})
    for i in range(3):  # a shared 80-token prefix: the prefix cache hits
        post(live, tally, "/v1/completions", {**good, "prompt": PREFIX + [900 + i]})
    post(live, tally, "/v1/completions", {**good, "prompt": [2016] + list(range(500, 650)), "max_tokens": 8})
    stream(live, tally, "/v1/chat/completions", {"model": "tiny", "max_tokens": 12, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "Hello there"}]})
    grpc_calls(live, tally)
    # bad requests: each gets its 4xx
    assert post(live, tally, "/v1/completions", {**good, "prompt": [2016, 5], "temperature": -1}) == 400
    assert post(live, tally, "/v1/completions", {**good, "model": "nope", "prompt": [2016, 5]}) == 404
    assert post(live, tally, "/v1/completions", {**good, "prompt": [2016, 5]}, key="wrong") == 401
    # a client that goes away after the first token: the server aborts it
    before = ingress_metrics(live)
    long = {"model": "tiny", "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "prompt": [2016, 77]}
    assert stream(live, tally, "/v1/completions", long, stop_after_first=True) is None
    tally.outcomes["aborted"] += 1
    tally.first_tokens += 1
    after = wait_until(lambda: (m := ingress_metrics(live)).get("maverick_requests_total:aborted") and m, 60,
                     "the server to see the client leave")
    abandoned = after["maverick_generation_tokens_total"] - before["maverick_generation_tokens_total"]
    # three slow streams fill the 3 admission slots: the next 4 requests get 429
    started = threading.Barrier(4)
    slow = {"model": "tiny", "max_tokens": 150, "ignore_eos": True, "temperature": 0}
    threads = [threading.Thread(target=stream, args=(live, tally, "/v1/completions", {**slow, "prompt": [2016, 60 + i]},
                                                     started.wait)) for i in range(3)]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    for _ in range(4):
        assert post(live, tally, "/v1/completions", {**good, "prompt": [2016, 5]}) == 429
    for t in threads:
        t.join(timeout=300)
    # a gang failure under two streams: both end with an in-stream 503, then the gang is rebuilt
    started = threading.Barrier(3)
    statuses = []
    threads = [threading.Thread(target=lambda i=i: statuses.append(stream(
        live, tally, "/v1/completions", {**long, "prompt": [2016, 90 + i]}, started.wait))) for i in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    os.kill(gang_pids()[0], signal.SIGKILL)  # an expert worker (rank 0)
    for t in threads:
        t.join(timeout=300)
    assert statuses == [503, 503], statuses
    conftest.wait_ready(live.url, timeout_s=180)
    for i in range(2):  # the rebuilt gang serves, and its new ranks export
        assert post(live, tally, "/v1/completions", {**good, "prompt": [2016, 95 + i]}) == 200
    return tally, abandoned


@pytest.fixture(scope="module")
def prometheus(live, tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus")
    key_file = work / "api_key"
    key_file.write_text(KEY)
    server = conftest.scrape_ray(work, live.url.removeprefix("http://"), key_file)
    yield server
    server.stop()


def test_every_panel_returns_data_and_counts_equal_the_clients(live, prometheus):
    tally, abandoned = drive_load(live)
    total = sum(tally.outcomes.values())
    app = f'application="{APP}"'

    def settled():
        got = prometheus.value(f"sum(ray_maverick_requests_total{{{app}}})")
        streams = prometheus.value(f"sum(ray_maverick_time_to_first_token_seconds_count{{{app}}})")
        served = prometheus.value('sum(maverick_requests_total{job="maverick-serve"})')
        return got == total and streams == tally.first_tokens and served == total

    wait_until(settled, 180, f"Prometheus to see {total} requests")
    assert sum(prometheus.targets_up().values()) >= 2  # Ray's agent and the serving port, with the key
    by_outcome = {r["metric"]["outcome"]: int(float(r["value"][1]))
                  for r in prometheus.query(f"sum by (outcome) (ray_maverick_requests_total{{{app}}})")}
    assert by_outcome == {k: v for k, v in tally.outcomes.items() if v}
    assert {k: v for k, v in tally.outcomes.items() if v}.keys() >= {"ok", "client_error", "rejected",
                                                                      "unavailable", "aborted"}
    received = prometheus.value(f"sum(ray_maverick_requests_received_total{{{app}}})")
    assert received == total  # every request received ends in exactly one outcome
    generated = prometheus.value(f"sum(ray_maverick_generation_tokens_total{{{app}}})")
    assert abs(generated - (tally.tokens + abandoned)) <= 0.01 * generated, (generated, tally.tokens, abandoned)
    assert prometheus.value(f"max(ray_maverick_gang_restarts{{{app}}})") == 1
    empty = []
    for uid in dashboards.DASHBOARDS:
        for title, expr in dashboards.queries(uid):
            promql = (expr.replace("$__rate_interval", "2m").replace("$application", APP)
                      .replace("$model", ".*").replace("$gang", ".*"))
            if not prometheus.query(promql):
                empty.append(f"{uid} / {title}: {promql}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
