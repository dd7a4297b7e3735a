"""`maverick serve` as an operator runs it, while its replicas die: Serve restarts a dead replica by
itself, so the CLI reports the unhealthy application, waits, reports the recovery and keeps serving.
A drain reaches every ingress replica.

One `maverick serve` of deploy/tiny-cpu.yaml with two ingress replicas, on free ports; the tests run
in order and the last one stops it.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.probe import http_ok, wait_until
from router.cli.serve import STATUS_POLL_S
from tests.router.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
MAVERICK = str(Path(sys.executable).with_name("maverick"))
INGRESS_REPLICAS = 2
DIRECT_HTTP_PORTS = range(30000, 31000)  # Serve's direct-ingress HTTP ports (RAY_SERVE_DIRECT_INGRESS_*_HTTP_PORT)

pytestmark = pytest.mark.timeout(900)


@dataclass
class Server:
    proc: subprocess.Popen
    http: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def output(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        assert self.proc.poll() is None, f"maverick serve exited {self.proc.returncode}:\n{self.output()[-3000:]}"
        return True

    def replicas(self, deployment: str) -> list[psutil.Process]:
        """This server's Serve replica processes of `deployment` (its local Ray runs below it)."""
        title = f"ray::ServeReplica:maverick:{deployment}"
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                name = (p.cmdline() or [""])[0]
                if name == title or name.startswith(title + "."):  # "....gangs.status" while a task runs
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-recovery")
    config = yaml.safe_load((ROOT / "deploy/tiny-cpu.yaml").read_text())
    args = config["applications"][0]["args"]
    args["model"] = str(ROOT / args["model"])
    args["serve"] = {"ingress_replicas": INGRESS_REPLICAS}
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    http, grpc = free_port(), free_port()
    with open(work / "serve.log", "w") as log:
        proc = subprocess.Popen([MAVERICK, "serve", str(work / "serve.yaml"), "--http-port", str(http),
                                 "--grpc-port", str(grpc), "--grace-period", "120"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                                start_new_session=True)  # its own process group: killpg below spares pytest
    live = Server(proc, http, work / "serve.log")
    try:
        wait_until(lambda: live.alive() and "maverick: ready" in live.output(), 400, "maverick serve to be ready")
        yield live
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def complete(server: Server, max_tokens: int = 4) -> dict:
    body = {"model": "tiny-maverick", "prompt": [2016, 5, 6], "max_tokens": max_tokens, "ignore_eos": True}
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        return json.loads(urllib.request.urlopen(req, timeout=60).read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{error.code}: {error.read()[:2000]!r}\n{server.output()[-3000:]}") from None


def kill_and_wait_for_recovery(server: Server, deployment: str) -> None:
    """SIGKILL one replica of `deployment`; the CLI must stay up while Serve replaces it, say so, and serve."""
    before = server.replicas(deployment)
    assert before, f"no {deployment} replica under maverick serve"
    count = len(before)
    unhealthy, recovered = (server.output().count(f"maverick: application {w}") for w in ("unhealthy", "recovered"))
    before[0].kill()

    def replaced() -> bool:
        now = server.replicas(deployment)
        return (server.alive() and len(now) == count and before[0].pid not in {p.pid for p in now}
                and http_ok(server.url + "/health/ready"))

    wait_until(replaced, 300, f"Serve to replace the {deployment} replica", poll_s=1.0)

    # the CLI reads Serve's status every STATUS_POLL_S: a replacement faster than that may pass unseen,
    # but an outage it reported must be followed by its recovery (AppWatch's own test covers the rest)
    def settled() -> bool:
        out = server.output()
        return server.alive() and (out.count("maverick: application recovered") - recovered
                                   >= out.count("maverick: application unhealthy") - unhealthy)

    time.sleep(2 * STATUS_POLL_S)  # a poll after the replacement has happened
    wait_until(settled, 120, "maverick serve to report the recovery", poll_s=1.0)
    assert complete(server)["usage"]["completion_tokens"] == 4
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_sigkill_of_the_gang_replica_leaves_the_service_up(server):
    assert complete(server)["usage"]["completion_tokens"] == 4
    kill_and_wait_for_recovery(server, "gangs")


def test_sigkill_of_an_ingress_replica_leaves_the_service_up(server):
    kill_and_wait_for_recovery(server, "ingress")


def test_the_watch_waits_out_an_unhealthy_application_and_stops_only_when_it_cannot_recover():
    from router.cli.serve import AppWatch

    said = []
    watch = AppWatch(60, said.append)
    assert watch.healthy_enough("OK", "", 0) and not said
    assert watch.healthy_enough("UNHEALTHY", "maverick: gang-0 UNHEALTHY", 10)
    assert watch.healthy_enough("UNREACHABLE", "Serve's controller does not answer", 40)  # the same episode
    assert watch.healthy_enough("OK", "", 45)
    assert said == ["maverick: application unhealthy: maverick: gang-0 UNHEALTHY; waiting up to 60s for Serve "
                    "to restart its replicas", "maverick: application recovered after 35s"]
    assert watch.healthy_enough("UNHEALTHY", "again", 100) and watch.healthy_enough("UNHEALTHY", "again", 160)
    assert not watch.healthy_enough("UNHEALTHY", "again", 161)  # past the patience: stop
    assert said[-1] == "maverick: application still unhealthy after 60s: again; stopping"
    assert not AppWatch(60, said.append).healthy_enough("DEPLOY_FAILED", "maverick: bad args", 0)
    assert said[-1] == "maverick: deployment failed: maverick: bad args"


def direct_ports(replica: psutil.Process) -> list[int]:
    """The replica's own HTTP port, the one HAProxy forwards to."""
    return [c.laddr.port for c in replica.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in DIRECT_HTTP_PORTS]


def ready_status(port: int) -> int | str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError as error:
        return str(error)


def test_sigterm_drains_every_ingress_replica(server):
    """The last test: SIGTERM while a stream runs; every ingress replica turns unready, the stream ends."""
    replicas = server.replicas("ingress")
    assert len(replicas) == INGRESS_REPLICAS
    ports = [direct_ports(r) for r in replicas]
    assert all(len(p) == 1 for p in ports), ports
    ports = [p[0] for p in ports]
    assert [ready_status(p) for p in ports] == [200] * INGRESS_REPLICAS
    body = {"model": "tiny-maverick", "prompt": [2016, 5, 6], "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    stream = urllib.request.urlopen(req, timeout=120)  # holds the drain open
    assert stream.readline().startswith(b"data: ")
    os.kill(server.proc.pid, signal.SIGTERM)
    wait_until(lambda: "maverick: draining" in server.output(), 60, "the drain to start")
    wait_until(lambda: [ready_status(p) for p in ports] == [503] * INGRESS_REPLICAS, 30,
               "every ingress replica to turn unready")
    stream.close()  # the client goes away: its request is aborted and the drain ends
    assert server.proc.wait(timeout=120) == 0, server.output()[-3000:]
    assert server.output().rstrip("\n").splitlines()[-1] == "maverick: stopped"
