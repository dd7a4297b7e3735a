"""A local Prometheus for a running deployment (`maverick observe`, `make observe`, the metrics test).

Debian's `prometheus` binary scrapes every Ray node's metrics agent through the service-discovery
file Ray's head writes, and the serving port's `/metrics`; it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from cluster.probe import wait_http_ok

RAY_SD_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")


def find_prometheus() -> str:
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None)
    if path is None:
        raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
    return path


def scrape_config(serve_target: str | None, sd_file: Path = RAY_SD_FILE, interval_s: float = 10,
                  api_key_file: Path | None = None) -> dict:
    jobs = [{"job_name": "ray", "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "5s"}]}]
    if serve_target:
        serve = {"job_name": "maverick-serve", "metrics_path": "/metrics",
                 "static_configs": [{"targets": [serve_target]}]}
        if api_key_file is not None:
            serve["authorization"] = {"credentials_file": str(api_key_file)}
        jobs.append(serve)
    interval = f"{interval_s:g}s"
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": jobs}


class PrometheusClient:
    """Instant queries against a Prometheus server's HTTP API."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def query(self, promql: str) -> list[dict]:
        """An instant query's result vector (empty: no data)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query failed: {promql}: {body}")
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def targets_up(self) -> dict[str, int]:
        """Scrape targets up, per job."""
        up: dict[str, int] = {}
        for r in self.query("up"):
            job = r["metric"].get("job", "?")
            up[job] = up.get(job, 0) + int(float(r["value"][1]))
        return up


class Prometheus(PrometheusClient):
    """A Prometheus server process on 127.0.0.1:`port`, with its data in `workdir`."""

    def __init__(self, workdir: Path, port: int, config: dict):
        super().__init__(f"http://127.0.0.1:{port}")
        self.workdir, self.port = Path(workdir), port
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> "Prometheus":
        log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [find_prometheus(), f"--config.file={self.config_path}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={self.workdir / 'data'}", "--storage.tsdb.retention.time=1d"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http_ok(self.url + "/-/ready", timeout_s, alive=lambda: self.proc.poll() is None, poll_s=0.3)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"prometheus did not start ({exc}): "
                               f"{(self.workdir / 'prometheus.log').read_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
