"""Capacity that follows load, on a Ray cluster whose nodes Ray's autoscaler adds and removes
(`tests/fake_cluster.py`): a gang fits only on a worker node, which the autoscaler starts for its
placement group.

One stream, then 24: Serve's autoscaler (our policy, fed by each gang's reported load) adds a gang,
Ray's autoscaler a node for it, and the ingress routes to it once it is warm. Then the quiet: two long
streams, one on each gang, want one gang; Serve removes one while they run, its stream moves to the
other gang token-exactly as a planned move, and its node goes once idle while one stream goes on.
Every output equals the in-process engine's; every change Serve applied is counted in the
controller's metrics."""

import os
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from cluster.probe import wait_until
from tests import ray_start
from tests.fake_cluster import FakeAutoscalingCluster
from tests.router.conftest import _ports, deploy
from tests.router.streams import assert_same, over_http, reference

pytestmark = pytest.mark.timeout(1200)
# a gang runs 4 sequences; the policy wants 2 per gang: 3 or more streams want a second gang
# downscale delay: 24 clients on 2 saturated cores keep a gang's load in a sawtooth (requests reach it in
# waves); a 2 s dip once stopped the second gang while it started, again and again
AUTOSCALING = {"min_gangs": 1, "max_gangs": 2, "target_load": 0.5, "upscale_delay_s": 0, "downscale_delay_s": 10,
               "metrics_interval_s": 0.5, "drain_grace_s": 1}
# a gang (0.1 + 1 + 1 CPUs, on one node) fits on no head of 1 CPU and once on a gang node of 3
GANG_NODE = {"resources": {"CPU": 3}, "min_workers": 0, "max_workers": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from cluster.local_ray import choose_proxy

    saved_proxy = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")
    choose_proxy("python")  # one proxy, on the head: a proxy on a gang node would hold it while draining
    fake = FakeAutoscalingCluster(tmp_path_factory.mktemp("nodes"), head_cpus=1, node_types={"gang_node": GANG_NODE})
    with ray_start.auth_mode("disabled"):  # as the fake cluster's head
        fake.start()
        try:
            ray.init(address=fake.address, log_to_driver=False)
            _ports.clear()
            yield fake
        finally:
            ray.shutdown()
            fake.stop()
            if saved_proxy is None:
                os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
            else:
                os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = saved_proxy


@pytest.fixture(scope="module")
def live(cluster, tmp_path_factory):
    return deploy(tmp_path_factory.mktemp("autoscaling"), proxy_location="HeadOnly", attention_workers=1,
                  expert_workers=1, placement_strategy="STRICT_PACK", attention={"num_cpus": 1},
                  experts={"num_cpus": 1}, engine={"max_num_seqs": 4}, autoscaling=AUTOSCALING,
                  graceful_shutdown_timeout_s=60)


def routing() -> dict:
    """The ingress's routing stats, asked from a task in the cluster, not from this process: on a cluster
    the driver joined by address, after another module's Ray in the same process, the driver's Serve
    handle never resolved a replica (its calls hung; the same call from a task answers at once)."""
    return ray.get(_routing_stats.options(num_cpus=0).remote(), timeout=120)


@ray.remote
def _routing_stats() -> dict:
    from ray import serve

    return serve.get_app_handle("maverick").routing_stats.remote().result(timeout_s=60)


def spec(i: int, max_tokens: int) -> dict:
    return {"prompt": [2016, 300 + 7 * i, 5, 9 + i], "max_tokens": max_tokens, "n": 1, "temperature": 0.0,
            "seed": None, "stop": [], "logprobs": None, "door": "http", "ignore_eos": True}


SHORT = [spec(i, 24) for i in range(4)]


def streams_until(live, streams: int, done) -> list[tuple[dict, list]]:
    """`streams` clients each sending short greedy requests, one after another, until `done(results)`."""
    stop, results = threading.Event(), []

    def client(k: int) -> None:
        n = 0
        while not stop.is_set():
            s = SHORT[(k + n) % len(SHORT)]
            results.append((s, over_http(live, s)))
            n += 1

    with ThreadPoolExecutor(streams) as pool:
        running = [pool.submit(client, k) for k in range(streams)]
        try:
            wait_until(lambda: done(results) or any(r.done() for r in running), 600, "the load's goal")
        finally:
            stop.set()
        for r in running:
            r.result()  # a client that failed fails the test here
    return results


def scaling_events(metrics_port: int) -> dict[tuple[str, str], float]:
    """(direction, reason) -> count of `maverick_gang_scaling_events`, as the head's metrics agent exports it
    (Serve's controller runs on the head)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.labels["direction"], s.labels["reason"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "ray_maverick_gang_scaling_events_total"}


def two_gangs_serving() -> bool:
    r = routing()
    return len(r["gangs"]) == 2 and all(r["ready"]) and min(r["requests"]) > 0


def test_gangs_and_nodes_follow_one_then_24_streams_then_the_quiet_and_every_token_is_exact(cluster, live):
    assert len(routing()["gangs"]) == 1 and cluster.worker_nodes() == 1  # the first gang's node, added for it
    results = streams_until(live, 1, lambda done: len(done) >= 3)
    results += streams_until(live, 24, lambda _: two_gangs_serving())
    assert cluster.worker_nodes() == 2  # the second gang's node
    wait_until(lambda: sum(routing()["in_flight"]) == 0, 120, "the burst's last streams")
    before = routing()["resume"]
    # long enough to outlast the scale-down: on 2 cores Serve stops a gang ~18 s after these start, and
    # a stream of 2000 tokens runs ~45 s beside another
    long = [spec(10 + i, 2000) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(over_http, live, s) for s in long]
        # the least busy gang takes each: one stream on each, before Serve removes one
        wait_until(lambda: routing()["in_flight"] == [1, 1] or any(r.done() for r in running), 60,
                   "one stream on each gang")
        placed = routing()["in_flight"]
        got = [r.result() for r in running]
    assert placed == [1, 1], placed
    after = routing()
    assert len(after["gangs"]) == 1, after
    moved = after["resume"]["planned_moves"] - before["planned_moves"]
    assert moved == 1 and after["resume"]["gave_up"] == before["gave_up"], (before, after["resume"])
    # the quiet goes on with one stream while Ray's autoscaler removes the idle node
    results += streams_until(live, 1, lambda _: cluster.worker_nodes() == 1)
    want = reference(live.model_dir, SHORT + long)
    by_prompt = {tuple(s["prompt"]): w for s, w in zip(SHORT, want)}
    for s, have in results:
        assert_same([s], [by_prompt[tuple(s["prompt"])]], [have])
    assert_same(long, want[len(SHORT):], got)
    # the controller's counter: up then down, both for the load (the agent exports every second)
    wait_until(lambda: scaling_events(cluster.metrics_port).get(("down", "load"), 0) >= 1, 60, "the scale-down counted")
    events = scaling_events(cluster.metrics_port)
    assert set(events) == {("up", "load"), ("down", "load")} and events[("up", "load")] == events[("down", "load")], \
        events
