"""A local Ray for the CLI and the benchmarks, its Serve front chosen before it starts. Importing it
costs no torch: `maverick serve` only starts Ray and Serve."""

from __future__ import annotations

import logging
import os
import random
import socket

import ray

log = logging.getLogger(__name__)


PROXIES = ("haproxy", "python")
SERVE_CONTROL_LOOP_S = 0.5
SERVE_METRICS_CACHE_MS = 1000  # Ray's agent exports every 5-10 s: a faster flush shows nothing sooner
HAPROXY_DEREGISTER_S = 3.0  # covers the controller telling HAProxy and HAProxy reloading


def choose_proxy(proxy: str = "haproxy") -> None:
    """Serve's HTTP/gRPC front for a Ray started by this process (its workers inherit the environment):
    `haproxy` (Ray 2.60's HAProxy mode: HAProxy forwards straight to the ingress replicas' own ports,
    no Python proxy in the data path) or `python` (Serve's ProxyActor). HAProxy also opens a stats
    page and a metrics port on every interface, and its backup proxy listens on two more (Ray's defaults
    8404, 9101, 8500 and 9500, free ones if taken)."""
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {PROXIES}, not {proxy!r}")
    if proxy == "python":
        os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
        return
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    # An ingress replica that stops stays open this long before it refuses connections, for load
    # balancers to deregister it; Ray's 30 s is meant for an external one routing to replicas. Here
    # the only router is Ray's own HAProxy, which retries a refused connection on another replica, so
    # a stop (Ctrl-C, `serve delete`, a redeploy) need not wait half a minute.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", str(HAPROXY_DEREGISTER_S))
    _own_replica_ports()
    # HAProxy's backup when no ingress replica is up (one just died): Serve's Python proxy, on fixed
    # ports; another local cluster's proxy there would answer for us with its application
    for name, default in (("RAY_SERVE_HAPROXY_STATS_PORT", 8404), ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101),
                          ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", 8500), ("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", 9500)):
        # a port picked here before may still be held by the HAProxy of a Ray being shut down: pick again
        # (a port the user set stays as set)
        if name not in os.environ or (_CHOSEN.get(name) == os.environ[name] and not _port_free(int(os.environ[name]))):
            os.environ[name] = _CHOSEN[name] = str(default if _port_free(default) else _free_port())


_CHOSEN: dict[str, str] = {}  # the HAProxy ports choose_proxy set in this process
REPLICA_PORT_SPAN = 50  # ingress replicas one local Ray may ever place on this host


def _own_replica_ports() -> None:
    """Give this Ray's ingress replicas port ranges no other local cluster uses. Every Ray starts them at
    30000 (HTTP) and 40000 (gRPC), and they bind with SO_REUSEPORT: a second cluster's replica binds the
    same port, the kernel spreads connections over both, and one cluster's HAProxy answers with the
    other's application. A range is taken if its every port is free now; ranges set by the user stay."""
    for kind, low in (("HTTP", 30000), ("GRPC", 40000)):
        low_name, high_name = f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT", f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT"
        if low_name in os.environ and _CHOSEN.get(low_name) != os.environ[low_name]:
            continue
        bases = list(range(low + REPLICA_PORT_SPAN, low + 1000, REPLICA_PORT_SPAN))  # 30000 is a default Ray's
        random.shuffle(bases)
        base = next((b for b in bases if all(_port_free(p) for p in range(b, b + REPLICA_PORT_SPAN))), low)
        os.environ[low_name] = _CHOSEN[low_name] = str(base)
        os.environ[high_name] = str(base + REPLICA_PORT_SPAN - 1)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _TokenAuthNotice(logging.Filter):
    """Ray 2.60 announces at every start that token auth is on by default; it is, and it stays on:
    drop only that notice (a warning that auth is *off* still shows)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


_TOKEN_AUTH_NOTICE = _TokenAuthNotice()  # one instance: adding it again is a no-op


def ensure_local_ray(num_cpus: float | None = None, dashboard: bool = False,
                     metrics_export_port: int | None = None, proxy: str = "haproxy") -> bool:
    """Start a small local Ray unless one is connected; returns whether this call started it.
    `dashboard` (on 127.0.0.1) makes Ray write the Prometheus service-discovery file; `proxy`: see
    `choose_proxy`."""
    if ray.is_initialized():
        return False
    choose_proxy(proxy)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's controller loop runs every 0.1 s by default: ~3% of a core on an idle 2-core host, for
    # reacting to deploys and deaths a few tenths of a second sooner than `SERVE_CONTROL_LOOP_S` allows
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", str(SERVE_CONTROL_LOOP_S))
    # every replica and handle flushes its cached Serve metrics 10 times a second by default
    os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", str(SERVE_METRICS_CACHE_MS))
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_AUTH_NOTICE)
    extra = {"_metrics_export_port": metrics_export_port} if metrics_export_port else {}
    if dashboard:  # and metrics reported every 5 s (Ray's default is 10 s)
        extra.update(dashboard_host="127.0.0.1", _system_config={"metrics_report_interval_ms": 5000})
    # logical CPUs may exceed the cores: ranks ask for fractions and share them
    # "local": a new Ray of our own, even where `ray start` left a cluster a plain init() would join
    ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 2), include_dashboard=dashboard,
             log_to_driver=False, object_store_memory=200 * 2**20, **extra)
    _stop_log_monitor()
    return True


def _stop_log_monitor() -> None:
    """Ray's log monitor tails every worker's log ten times a second to forward lines to drivers; with
    log_to_driver off nobody reads what it sends (~0.7% of a core idle). Logs stay in the session dir."""
    node = getattr(ray._private.worker, "_global_node", None)  # private, Ray 2.60: absent, nothing lost
    try:
        if node is not None:
            node.kill_log_monitor()
    except Exception as exc:
        log.debug("log monitor left running: %s", exc)
