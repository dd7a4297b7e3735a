"""A Ray cluster whose nodes Ray's own autoscaler adds and removes, on one machine.

Ray's fake multi-node provider (autoscaler v1, `RAY_FAKE_CLUSTER=1`) starts each new node's raylet
from the autoscaler's monitor process, as real node processes; an idle node is terminated after the
config's idle timeout. `ray.cluster_utils.AutoscalingCluster` wraps the same provider, but in the
2.60 wheel it cannot construct (its `fake_multi_node/example.yaml` is not shipped) and it runs
`ray stop --force`, which kills every Ray on the host. So the head is started here with the whole
config inline and its own temp dir and ports, in a new session; every process of that session (the
nodes the monitor started included: they outlive the head) is killed by PID at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

MB = 2**20
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeAutoscalingCluster:
    """`node_types`: name -> {"resources": {...}, "min_workers": n, "max_workers": m}."""

    def __init__(self, work: Path, head_cpus: float, node_types: dict[str, dict], idle_timeout_minutes: float = 0.1):
        self.work, self.head_cpus = work, head_cpus
        self.port, self.metrics_port = _free_port(), _free_port()
        self.config = {
            "cluster_name": "maverick-fake", "max_workers": sum(t["max_workers"] for t in node_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{self.port}"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
                **{name: {"node_config": {}, **t,
                          "resources": {"object_store_memory": 100 * MB, **t["resources"]}}
                   for name, t in node_types.items()}},
            "head_node_type": "ray.head.default", "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            # autoscaler v1 reads the file as written: every section must be there
            "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}
        self.head: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        # a token in ~/.ray (left by another Ray) turns auth on for `ray start` but not for a driver
        # that did not ask: one mode for all
        return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "0",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self) -> None:
        config = self.work / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        command = [RAY, "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                   f"--num-cpus={self.head_cpus}", f"--object-store-memory={200 * MB}",
                   f"--autoscaling-config={config}", "--include-dashboard=false", "--disable-usage-stats",
                   f"--temp-dir={self.work / 'ray'}", "--dashboard-agent-listen-port=0",
                   f"--metrics-export-port={self.metrics_port}", f"--ray-client-server-port={_free_port()}",
                   "--min-worker-port=0", "--max-worker-port=0", "--system-config",
                   json.dumps({"metrics_report_interval_ms": 1000})]
        log = (self.work / "head.log").open("w")
        self.head = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while socket.socket().connect_ex(("127.0.0.1", self.port)) != 0:
            if self.head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head did not start: {(self.work / 'head.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def worker_nodes(self) -> int:
        """Alive nodes other than the head."""
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"] and not n["Resources"].get("node:__internal_head__"))

    def _session(self) -> list[psutil.Process]:
        mine = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.head.pid:
                    mine.append(process)
            except (ProcessLookupError, PermissionError):
                pass
        return mine

    def stop(self) -> None:
        """Every process of the session, by PID: the head's daemons and the nodes the monitor started
        (nothing of a test cluster is worth a graceful stop)."""
        if self.head is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self._session()
            for process in left:
                try:
                    process.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(left, timeout=5)
        self.head.wait()
        self.head = None
