"""Two gangs behind one ingress: prefix affinity, spreading, and one gang failing while the other serves."""

import json
import os
import signal
import urllib.error
import urllib.request

import pytest

from cluster.probe import wait_until
from tests.router.conftest import deploy
from tests.router.gangs import every_gang_stats

pytestmark = pytest.mark.timeout(600)
PREFIX = [2016] + list(range(400, 479))  # 80 tokens: longer than the 64-token affinity prefix


@pytest.fixture(scope="module")
def live(local_ray, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("gangs"), num_gangs=2, attention_workers=2, expert_workers=1)
    yield server


def complete(live, prompt, max_tokens=4):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    req = urllib.request.Request(live.url + "/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def routing():
    from ray import serve

    return serve.get_app_handle("maverick").routing_stats.remote().result()


def gang_stats(i):
    return every_gang_stats()[i]


def prefix_hits(stats) -> list[int]:
    return [r["kv"]["prefix_hits_tokens"] for r in stats["ranks"] if "kv" in r]


def test_shared_prefix_lands_on_one_attention_worker_and_hits_its_cache(live):
    before = routing()["requests"]
    stats_before = [gang_stats(i) for i in range(2)]
    for suffix in range(6):
        status, body = complete(live, PREFIX + [900 + suffix, 901, 902])
        assert status == 200, body
    after = routing()["requests"]
    grown = [a - b for a, b in zip(after, before)]
    assert sorted(grown) == [0, 6], grown
    gang = grown.index(6)
    stats = gang_stats(gang)
    per_worker = {w: n - stats_before[gang]["requests_per_worker"].get(w, 0)
                  for w, n in stats["requests_per_worker"].items()}
    assert sorted(per_worker.values())[-1] == 6, per_worker
    hits = [a - b for a, b in zip(prefix_hits(stats), prefix_hits(stats_before[gang]))]
    assert max(hits) >= 5 * 64, hits  # five of the six found the shared prefix cached


def test_unrelated_requests_spread_over_both_gangs(live):
    before = routing()["requests"]
    for i in range(16):
        status, body = complete(live, [2016] + [(37 * i + 11 * k) % 1900 + 50 for k in range(70)])
        assert status == 200, body
    grown = [a - b for a, b in zip(routing()["requests"], before)]
    assert sum(grown) == 16 and min(grown) >= 2, grown


def test_killing_one_gangs_expert_moves_its_streams_to_the_other_gang(live):
    """Its in-flight streams resume on the other gang at once (no wait for the rebuild), exactly."""
    from tests.router.streams import assert_same, reference, run_with_fault

    specs = [{"prompt": PREFIX[: 8 + i] if i % 2 else [2016, 300 + 7 * i, 5, 9], "max_tokens": 60, "n": 1 + i % 2,
              "temperature": 0.8 if i % 3 else 0.0, "seed": 40 + i if i % 3 else None,
              "stop": ["e "] if i % 4 == 2 else [], "logprobs": 1 if i % 4 == 3 else None,
              "door": "grpc" if i % 3 == 0 else "http"} for i in range(16)]
    expected = reference(live.model_dir, specs)
    before = routing()
    victim = gang_stats(1)
    expert_pid = victim["ranks"][0]["pid"]  # ranks are in order: experts first, attention last
    got, pause = run_with_fault(live, specs, lambda: os.kill(expert_pid, signal.SIGKILL))
    assert_same(specs, expected, got)
    after = routing()
    moved = after["resume"]["resumed_requests"] - before["resume"]["resumed_requests"]
    assert moved >= 1 and after["resume"]["gave_up"] == before["resume"]["gave_up"]
    print(f"\n2 gangs, SIGKILL of one's expert: {moved} streams moved, longest pause {pause:.1f}s")
    wait_until(lambda: routing()["ready"] == [True, True], 120, "the failed gang back")
    for i in range(4):
        status, body = complete(live, PREFIX[: 10 + i] if i % 2 else PREFIX + [i])
        assert status == 200, body
