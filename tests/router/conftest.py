"""A live local deployment per test module (per package for `default_app/`, the modules that share
the default app): a real Ray, Serve on 127.0.0.1 at a free port, our app;
and, for the metrics tests, a Ray exporting metrics every second with a real Prometheus scraping it."""

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.probe import wait_http_ok
from cluster.serve_config import GRPC_SERVICER
from tests import ray_start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str  # http://127.0.0.1:PORT
    model_dir: Path
    model_name: str
    api_key: str | None
    grpc_target: str = ""
    app_name: str = "maverick"

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def wait_ready(url: str, timeout_s: float = 180) -> None:
    wait_http_ok(url + "/health/ready", timeout_s)


def running_local_ray():
    """A local Ray for one module (or one package, `default_app/`), shut down after."""
    import ray

    from cluster.local_ray import choose_proxy

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    choose_proxy("haproxy")  # what `maverick serve` runs by default
    # logical CPUs above the 2 cores: replicas and ranks ask for fractions and share them
    ray_start.start(lambda: ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                                     object_store_memory=200 * 2**20))
    _ports.clear()  # a new Ray: its Serve is started by the first deploy
    yield
    # Serve goes down with this Ray; serve.shutdown() first would only wait for the replicas' drain
    ray.shutdown()


local_ray = pytest.fixture(running_local_ray, scope="module", name="local_ray")


@pytest.fixture(scope="module")
def ray_with_metrics():
    """A Ray whose dashboard runs (it writes the service-discovery file Prometheus reads) and whose
    agent exports every second, on fixed local ports."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray_start.start(lambda: ray.init(
        num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
        _metrics_export_port=free_port(), _system_config={"metrics_report_interval_ms": 1000},
        log_to_driver=False, object_store_memory=200 * 2**20))
    _ports.clear()
    yield ray
    ray.shutdown()


def scrape_ray(work: Path, serve_target: str | None = None, api_key_file: Path | None = None):
    """A Prometheus scraping `ray_with_metrics`' agents every second (and the serving port, if given)."""
    from ray._private.worker import _global_node

    from cluster.observe import Prometheus, scrape_config
    from cluster.probe import wait_until

    sd_file = _global_node.get_session_dir_path() + "/prom_metrics_service_discovery.json"
    wait_until(lambda: os.path.exists(sd_file), 60, "Ray's service-discovery file")
    config = scrape_config(serve_target, sd_file=sd_file, interval_s=1, api_key_file=api_key_file)
    return Prometheus(work, free_port(), config).start()


def deploy(tmp_dir: Path, name: str = "maverick", route_prefix: str = "/", proxy_location: str | None = None,
           **args) -> Live:
    """Serve our app (Serve started on a free port by the first call); the tiny checkpoint is written
    by the app itself (make_tiny)."""
    from ray import serve

    from router.app import build

    cluster = "local"
    if cluster not in _ports:  # the first app on this Ray: start Serve on free ports
        _ports[cluster] = free_port(), free_port()
        serve.start(proxy_location=proxy_location, http_options={"host": "127.0.0.1", "port": _ports[cluster][0]},
                    grpc_options={"port": _ports[cluster][1], "grpc_servicer_functions": [GRPC_SERVICER]})
    _port, _grpc_port = _ports[cluster]
    model = tmp_dir / "tiny"
    app_args = {"model": str(model), "make_tiny": "tiny-maverick", "served_model_name": "tiny", **args}
    serve.run(build(app_args), name=name, route_prefix=route_prefix, blocking=False)
    live = Live(f"http://127.0.0.1:{_port}{route_prefix.rstrip('/')}", model, "tiny", args.get("api_key"),
                f"127.0.0.1:{_grpc_port}", name)
    wait_ready(live.url)
    return live


_ports: dict[str, tuple[int, int]] = {}  # "local" → (HTTP port, gRPC port) of this module's Serve
