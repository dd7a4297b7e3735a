"""Two local Rays on one host must not share ingress replica ports (`cluster.local_ray._own_replica_ports`):
replicas bind with SO_REUSEPORT, so a shared port silently splits one cluster's traffic with another's."""

import os
import socket

import pytest

from cluster import local_ray

NAMES = [f"RAY_SERVE_DIRECT_INGRESS_{m}_{k}_PORT" for m in ("MIN", "MAX") for k in ("HTTP", "GRPC")]


@pytest.fixture
def clean_env(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(local_ray, "_CHOSEN", {})
    yield
    for name in NAMES:
        os.environ.pop(name, None)


def _range(kind: str) -> range:
    low = int(os.environ[f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT"])
    return range(low, int(os.environ[f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT"]) + 1)


def test_ranges_avoid_ports_another_cluster_holds(clean_env):
    held = []
    try:  # another cluster's replicas: SO_REUSEPORT listeners on the first port of every candidate range
        for base in range(30000, 31000, local_ray.REPLICA_PORT_SPAN)[:-1]:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(("127.0.0.1", base))
            except OSError:  # held already (a Ray on this host): as good
                sock.close()
                continue
            sock.listen()
            held.append(sock)
        local_ray._own_replica_ports()
        http = _range("HTTP")
        assert len(http) == local_ray.REPLICA_PORT_SPAN and http.start == 30950  # the only range left free
        assert 40000 < _range("GRPC").start < 41000 and len(_range("GRPC")) == local_ray.REPLICA_PORT_SPAN
    finally:
        for sock in held:
            sock.close()


def test_two_choices_differ_and_the_users_range_stays(clean_env, monkeypatch):
    local_ray._own_replica_ports()
    first = _range("HTTP")
    assert 30000 < first.start and first.stop <= 31000
    # a second choice in this process (another local Ray after the first stopped) picks again
    seen = {first.start}
    for _ in range(10):
        local_ray._own_replica_ports()
        seen.add(_range("HTTP").start)
    assert len(seen) > 1
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "35000")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "35009")
    local_ray._own_replica_ports()
    assert _range("HTTP") == range(35000, 35010)


def test_the_backup_proxy_ports_are_free_ones(clean_env, monkeypatch):
    """HAProxy falls back to Serve's Python proxy while no ingress replica is up (one just died); on a
    port another local cluster's proxy holds, that cluster answered for us with its own model."""
    fallback = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
    for name in fallback + ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                            "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)  # restored (here: removed again) after the test
    with socket.socket() as other:  # another cluster's proxy on Ray's default port
        try:
            other.bind(("", 8500))
            other.listen()
        except OSError:  # held already (a Ray on this host): as good
            pass
        local_ray.choose_proxy("haproxy")
        assert os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] != "8500"
        assert os.environ["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"]
