"""Requests survive a dying worker. 16 streams (greedy and seeded, `n=2`, stop strings, logprobs, JSON
schemas, HTTP and gRPC) run against a gang of 1 attention + 2 expert workers; once every stream has its first
chunk, a real process of the gang is killed or stopped. Every stream must go on after a pause and
end exactly as the same requests do in one in-process engine: no error, no token lost or repeated.
A second app with `migration_limit: 0` shows the error table's 503 and, for a hung gang, 504."""

import json
import os
import random
import signal
import urllib.request

import psutil
import pytest

from cluster.probe import wait_until
from tests.router.conftest import deploy
from tests.router.streams import assert_same, reference, run_with_fault

STREAMS = 16
# structured streams are mid-object when the fault comes: each resumes through a fresh grammar matcher
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9999}, "minItems": 2,
              "maxItems": 6},
    "note": {"type": "string", "maxLength": 40}},
    "required": ["title", "items", "note"], "additionalProperties": False}
STRUCTURED = {0, 5, 8, 13}  # greedy and seeded n=2, over both doors
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def live(local_ray, tmp_path_factory):
    return deploy(tmp_path_factory.mktemp("chaos"), expert_workers=2, max_pending_requests=STREAMS,
                  collective_timeout_s=10)


@pytest.fixture(scope="module")
def specs_and_expected(live):
    rng = random.Random(13)
    specs = []
    for i in range(STREAMS):
        seeded = i % 2 == 1
        specs.append({"prompt": [rng.randrange(3, 2000) for _ in range(rng.randrange(3, 30))],
                      "max_tokens": rng.randrange(60, 90), "n": 2 if i % 4 == 1 else 1,
                      "temperature": 0.8 if seeded else 0.0, "seed": 500 + i if seeded else None,
                      "stop": ["e ", "an"] if i % 4 == 2 else [], "logprobs": 2 if i % 4 == 3 else None,
                      "door": "grpc" if i % 3 == 0 else "http", "schema": SCHEMA if i in STRUCTURED else None})
    expected = reference(live.model_dir, specs)
    for i in STRUCTURED:  # whole objects in the fault-free run, so a fault lands mid-object
        assert all(c["finish"] == "stop" and json.loads(c["text"]) for c in expected[i]), expected[i]
    return specs, expected


def handle(name: str, app: str = "maverick"):
    from ray import serve

    return serve.get_deployment_handle(name, app) if name != "ingress" else serve.get_app_handle(app)


def gang_pids(app: str = "maverick") -> list[int]:
    """Rank processes in rank order: expert ranks first, attention last."""
    return [r["pid"] for r in handle("gangs", app).stats.remote().result()["ranks"]]


def resume_stats(app: str = "maverick") -> dict:
    return handle("ingress", app).routing_stats.remote().result()["resume"]


def wait_serving(app: str = "maverick") -> None:
    wait_until(lambda: handle("gangs", app).status.remote().result()["ready"]
               and all(handle("ingress", app).routing_stats.remote().result()["ready"]), 240,
               "the gang ready again", poll_s=0.5)


def kill(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def check_case(live, specs_and_expected, fault, what: str, resumes: bool = True) -> None:
    specs, expected = specs_and_expected
    wait_serving()
    before = resume_stats()
    got, pause = run_with_fault(live, specs, fault)
    after = resume_stats()
    assert_same(specs, expected, got)
    resumed = after["resumed_requests"] - before["resumed_requests"]
    assert (resumed >= 1 if resumes else resumed == 0) and after["gave_up"] == before["gave_up"], (before, after)
    print(f"\n{what}: {resumed} requests resumed, longest pause a client saw {pause:.1f}s")


def test_sigkill_of_an_expert_worker(live, specs_and_expected):
    pids = gang_pids()
    check_case(live, specs_and_expected, lambda: kill(pids[0]), "SIGKILL expert")


def test_sigkill_of_the_attention_worker(live, specs_and_expected):
    pids = gang_pids()
    check_case(live, specs_and_expected, lambda: kill(pids[-1]), "SIGKILL attention")


def test_sigstop_of_an_expert_worker_is_a_hang_detected_and_recovered(live, specs_and_expected):
    pids = gang_pids()
    before = handle("gangs").stats.remote().result()["hangs_found"]
    try:
        check_case(live, specs_and_expected, lambda: kill(pids[0], signal.SIGSTOP), "SIGSTOP expert")
    finally:
        kill(pids[0])  # the torn-down gang's actor, if Ray has not killed it yet
    after = handle("gangs").stats.remote().result()["hangs_found"]
    # one hang declared (the watchdog normally; tests/cluster/test_gang.py shows it alone finds one)
    assert sum(after.values()) == sum(before.values()) + 1, (before, after)


def test_an_expert_that_raises_in_a_step(live, specs_and_expected):
    check_case(live, specs_and_expected, lambda: handle("gangs").inject_fault.remote(0, 3).result(),
               "expert raises on a step")


def test_sigkill_of_the_gang_replica_leaves_its_ranks_and_streams_untouched(live, specs_and_expected):
    """No token passes through the gang's replica: its death resumes nothing, and the replica Serve
    starts in its place takes over the same ranks."""
    wait_serving()
    status, pids = handle("gangs").status.remote().result(), gang_pids()
    check_case(live, specs_and_expected, lambda: kill(status["pid"]), "SIGKILL gang replica", resumes=False)
    wait_until(lambda: handle("gangs").status.remote().result()["pid"] != status["pid"], 240,
               "Serve's new gang replica", poll_s=0.5)
    wait_serving()
    now = handle("gangs").status.remote().result()
    assert (now["gang"], now["epoch"], now["restarts"]) == (status["gang"], status["epoch"], status["restarts"])
    assert gang_pids() == pids
    assert handle("gangs").stats.remote().result()["adoptions"] == 1


def poisoned_id(text: str) -> str:
    """A request id that unpickles everywhere but in an ingress replica: a batch carrying its outputs fails
    there as one from a mismatched build would, with the gang healthy. Pickled by value (nested)."""
    def revive(text: str) -> str:
        with open("/proc/self/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0]
        if title.startswith(b"ray::ServeReplica:") and title.endswith(b":ingress"):
            raise RuntimeError("this batch does not unpickle here")

        class Poisoned(str):
            def __reduce__(self):
                return revive, (str(self),)

        return Poisoned(text)

    return revive(text)


def test_a_channel_that_fails_in_the_ingress_is_dialed_again_not_taken_for_a_failed_gang(live):
    from workers.protocol import GenerateRequest
    from workers.sampling_params import SamplingParams

    def complete() -> int:
        body = {"prompt": [2016, 5, 6], "max_tokens": 4, "ignore_eos": True}
        req = urllib.request.Request(live.url + "/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]["completion_tokens"]

    wait_serving()
    assert complete() == 4  # the ingress listens on its channel now
    epoch, attention = handle("gangs").attention.remote().result()
    stats = handle("ingress").routing_stats.remote().result()
    failures = stats.get("channel_failures", [0])[0]
    # outputs for the ingress's channel that its listener cannot unpickle
    request = GenerateRequest([5, 6, 7], SamplingParams(max_tokens=2), poisoned_id("poison"))
    attention[0].submit.remote(request, stats["consumer"])

    def reacted() -> dict | None:
        now = handle("ingress").routing_stats.remote().result()
        return now if now.get("channel_failures", [0])[0] > failures or not now["ready"][0] else None

    now = wait_until(reacted, 60, "the ingress to see its channel fail", poll_s=0.2)
    assert now["ready"] == [True], now  # the gang is healthy: no 503s until a rebuild that never comes
    assert complete() == 4
    assert handle("gangs").status.remote().result()["epoch"] == epoch  # the same gang, dialed again


# -- when resuming is not allowed or takes too long --------------------------------------------------


@pytest.fixture(scope="module")
def strict(live, tmp_path_factory):
    return deploy(tmp_path_factory.mktemp("strict"), name="strict", route_prefix="/strict", migration_limit=0,
                  request_timeout_s=4)


def stream_then(strict, fault) -> dict:
    """A streamed completion: after its first event, `fault()`; the last event before [DONE]."""
    body = {"prompt": [2016, 5, 6], "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(strict.url + "/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 1:
                fault()
    return events[-1]


def test_a_request_that_may_not_move_ends_with_503(strict):
    wait_serving("strict")
    pid = gang_pids("strict")[-1]
    last = stream_then(strict, lambda: kill(pid))
    assert last["error"]["code"] == 503 and last["error"]["type"] == "service_unavailable", last


def test_a_request_whose_timeout_passes_while_its_gang_hangs_ends_with_504(strict):
    wait_serving("strict")
    pid = gang_pids("strict")[-1]
    try:
        last = stream_then(strict, lambda: kill(pid, signal.SIGSTOP))
    finally:
        kill(pid)
    assert last["error"]["code"] == 504 and last["error"]["type"] == "timeout", last


def test_deleting_an_application_leaves_none_of_its_ranks_and_forgets_its_gangs(live, strict):
    """Detached ranks outlive a dead replica, never a deleted application: its replicas stop their gangs."""
    from ray import serve
    from ray.experimental import internal_kv

    from cluster.gang_registry import KV_NAMESPACE

    wait_serving()
    pids = gang_pids()
    assert internal_kv._internal_kv_list("gangs/maverick/", namespace=KV_NAMESPACE)
    serve.delete("maverick")
    wait_until(lambda: not any(running(pid) for pid in pids), 120, "the deleted application's ranks gone")
    assert not internal_kv._internal_kv_list("gangs/maverick/", namespace=KV_NAMESPACE)
    assert internal_kv._internal_kv_list("gangs/strict/", namespace=KV_NAMESPACE)  # the other app's gang


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
