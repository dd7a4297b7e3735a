"""Gangs that follow load, on a real Serve: a burst of streams makes Serve's autoscaler (our policy,
fed by each gang's reported load) add a gang, which the ingress starts using once it is warm; a
lighter load after it removes the gang again. A gang removed while streams run on it drains: its
streams move to the other gang, token-exactly, as planned moves (not failures). Every change Serve
applied is counted in the controller's metrics."""

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.probe import wait_until
from tests.router.conftest import deploy
from tests.router.streams import assert_same, over_http, reference

pytestmark = pytest.mark.timeout(900)
# a gang runs 4 sequences; the policy wants 2 per gang: 3 or more streams want a second gang
AUTOSCALING = {"min_gangs": 1, "max_gangs": 2, "target_load": 0.5, "upscale_delay_s": 0, "downscale_delay_s": 2,
               "metrics_interval_s": 0.5, "drain_grace_s": 1}


@pytest.fixture(scope="module")
def live(local_ray, tmp_path_factory):
    return deploy(tmp_path_factory.mktemp("autoscaling"), attention_workers=1, expert_workers=1,
                  engine={"max_num_seqs": 4}, autoscaling=AUTOSCALING, graceful_shutdown_timeout_s=60)


def routing():
    from ray import serve

    return serve.get_app_handle("maverick").routing_stats.remote().result()


def spec(i: int, max_tokens: int) -> dict:
    return {"prompt": [2016, 300 + 7 * i, 5, 9 + i], "max_tokens": max_tokens, "n": 1, "temperature": 0.0,
            "seed": None, "stop": [], "logprobs": None, "door": "http", "ignore_eos": True}


def burst_until(live, done, streams: int = 8) -> list[tuple[dict, list]]:
    """`streams` clients each sending short greedy requests, one after another, until `done()`."""
    specs = [spec(i, 24) for i in range(4)]
    stop, results = threading.Event(), []

    def client(k: int) -> None:
        n = 0
        while not stop.is_set():
            s = specs[(k + n) % len(specs)]
            results.append((s, over_http(live, s)))
            n += 1

    with ThreadPoolExecutor(streams) as pool:
        running = [pool.submit(client, k) for k in range(streams)]
        try:
            wait_until(lambda: done() or any(r.done() for r in running), 600, "the burst's goal")
        finally:
            stop.set()
        for r in running:
            r.result()  # a client that failed fails the test here
    return results


def scaling_events() -> dict[tuple[str, str], float]:
    """(direction, reason) -> count of `maverick_gang_scaling_events`, as Ray's metrics agent exports it."""
    from prometheus_client.parser import text_string_to_metric_families
    from ray._private.worker import _global_node

    url = f"http://127.0.0.1:{_global_node.metrics_export_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.labels["direction"], s.labels["reason"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "ray_maverick_gang_scaling_events_total"}


def two_gangs_serving() -> bool:
    r = routing()
    return len(r["gangs"]) == 2 and all(r["ready"]) and min(r["requests"]) > 0


def test_a_burst_adds_a_gang_and_a_gang_removed_under_load_moves_its_streams_exactly(live):
    """The burst's streams are exact on whichever gang served them. Then two long streams, one on each
    gang: two requests want one gang, so Serve removes one while they run; the leaving gang's stream
    moves to the other after the grace, every token once, as a planned move."""
    assert len(routing()["gangs"]) == 1
    results = burst_until(live, two_gangs_serving)
    wait_until(lambda: sum(routing()["in_flight"]) == 0, 120, "the burst's last streams")
    before = routing()["resume"]
    specs = [spec(10 + i, 3500) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(over_http, live, s) for s in specs]
        # the least busy gang takes each: one stream on each, before Serve removes one
        wait_until(lambda: routing()["in_flight"] == [1, 1] or any(r.done() for r in running), 60,
                   "one stream on each gang")
        placed = routing()["in_flight"]
        got = [r.result() for r in running]
    assert placed == [1, 1], placed
    short = [spec(i, 24) for i in range(4)]
    want = reference(live.model_dir, short + specs)
    by_prompt = {tuple(s["prompt"]): w for s, w in zip(short, want)}
    for s, have in results:
        assert_same([s], [by_prompt[tuple(s["prompt"])]], [have])
    assert_same(specs, want[len(short):], got)
    after = routing()
    assert len(after["gangs"]) == 1, after
    moved = after["resume"]["planned_moves"] - before["planned_moves"]
    assert moved == 1 and after["resume"]["gave_up"] == before["gave_up"], (before, after["resume"])
    assert_same([short[0]], [by_prompt[tuple(short[0]["prompt"])]], [over_http(live, short[0])])  # one serves on
    # the controller's counter: up then down, both for the load (the agent exports every few seconds)
    wait_until(lambda: scaling_events().get(("down", "load"), 0) >= 1, 60, "the scale-down counted")
    events = scaling_events()
    assert set(events) == {("up", "load"), ("down", "load")} and events[("up", "load")] == events[("down", "load")], \
        events
