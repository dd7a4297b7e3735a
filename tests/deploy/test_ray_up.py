"""`ray up` that works the first time, for real, on two hosts: deploy/ray/onprem.yaml against real
sshd servers in two network + PID namespaces of this machine, `ray up -y` (the head, then Ray's
autoscaler on the head brings up the worker host), `maverick serve ... --address auto --detach`
through `ray exec` with the gang spread over both hosts, an OpenAI request answered from outside,
token auth refusing a client without the token, `ray down -y`, no raylet, replica or rank left running.

What differs from the shipped file, and why: the hosts and the SSH login (this machine); the token's
local path (made here, not the operator's ~/.ray/auth_token); the install steps: the venv this test runs
in is linked instead of pip-installing torch from the registry again (minutes), and the CPU kernels'
build cache `make install` filled is copied into the new home (a first serve builds them: ~50 s on 2
cores); and one more file mount, the Serve config, which is deploy/tiny-cpu.yaml with the ranks spread
and HTTP on the head's address. Everything else (file mounts with the .gitignore filter, the environment
line, the start commands) runs verbatim.
"""

import json
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.probe import wait_until
from tests.deploy.hosts import USER, Hosts

# up, serve, down, then worker raylets that exit after the head's GCS: 300 s was not enough on a slow
# 2-core machine
pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
CLUSTER = "maverick-rayup-test"
RECONNECT_S = 10
RAY_DAEMONS = ("gcs_server", "raylet")
RAY_NODE_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
NODES_ALIVE = "python -c 'import ray; ray.init(logging_level=40); print(\"alive:\", sum(n[\"Alive\"] for n in ray.nodes()))'"


def _ray_processes(processes=None) -> list[str]:
    """Ray's daemons and worker processes (workers are named `ray::<actor or task>`)."""
    names = [p.info["name"] or "" for p in (processes or psutil.process_iter(["name"]))]
    return [n for n in names if n in RAY_DAEMONS or n.startswith("ray::")]


def _cluster_config(hosts: Hosts, token_file: Path, serve_config: Path) -> Path:
    config = yaml.safe_load((REPO / "deploy" / "ray" / "onprem.yaml").read_text())
    config["cluster_name"] = CLUSTER
    config["provider"].update(head_ip=hosts.hosts[0].ip, worker_ips=[h.ip for h in hosts.hosts[1:]])
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(hosts.client_key)}
    config["file_mounts"] = {"~/maverick": str(REPO), "~/.ray/auth_token": str(token_file),
                             "~/serve.yaml": str(serve_config)}
    environment = [c for c in config["setup_commands"] if "maverick-env" in c]
    assert len(environment) == 1
    config["setup_commands"] = environment + [f"ln -sfn {Path(sys.prefix)} ~/maverick-venv"]
    # `ray down` stops the head only; a worker host's raylet exits once the head's GCS has been gone for
    # gcs_rpc_server_reconnect_timeout_s (60 s by default): 10 s here, to spend less of the test waiting
    starts = config["worker_start_ray_commands"]
    assert sum("ray start" in c for c in starts) == 1
    config["worker_start_ray_commands"] = [f"RAY_gcs_rpc_server_reconnect_timeout_s={RECONNECT_S} {c}"
                                           if "ray start" in c else c for c in starts]
    path = hosts.root / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _serve_config(hosts: Hosts) -> Path:
    config = yaml.safe_load((REPO / "deploy" / "tiny-cpu.yaml").read_text())
    config["http_options"]["host"] = hosts.hosts[0].ip  # reached from outside, as behind a firewall
    config["applications"][0]["args"]["placement_strategy"] = "SPREAD"  # a rank on each host
    path = hosts.root / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ray_cli(*args: str, timeout_s: float) -> str:
    done = subprocess.run([str(RAY), *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _port_open(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((ip, port)) == 0


def _http(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict | None]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response) if body is not None else None
    except urllib.error.HTTPError as err:
        return err.code, None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    two = Hosts(tmp_path_factory.mktemp("rayup"))
    try:
        two.start()
        for host in two.hosts:
            wait_until(host.listening, 30, f"sshd on {host.name}")
        yield two
    finally:
        two.stop()


def test_ray_up_on_two_hosts_serve_and_down(hosts):
    head, worker = hosts.hosts
    token = secrets.token_hex(16)
    token_file = hosts.root / "auth_token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = _cluster_config(hosts, token_file, _serve_config(hosts))
    try:
        _ray_cli("up", "-y", "--no-config-cache", str(config), timeout_s=600)
        # what the file mounts and the .gitignore filter shipped: the project, no venv, no checkpoints
        shipped = hosts.home / "maverick"
        assert (shipped / "router" / "app.py").exists() and not (shipped / ".venv").exists()
        assert (hosts.home / ".ray" / "auth_token").read_text().strip() == token
        # the worker host is brought up by Ray's autoscaler on the head, over SSH, after `ray up` returns
        wait_until(lambda: "alive: 2" in _ray_cli("exec", str(config), NODES_ALIVE, timeout_s=120), 300,
                   "the worker host joining the cluster")

        # the dashboard listens on the head's 127.0.0.1 only, and refuses a client without the token
        dashboard = "curl -s -o /dev/null -w 'dashboard=%{http_code}\\n' http://127.0.0.1:8265/api/version"
        assert "dashboard=401" in _ray_cli("exec", str(config), dashboard, timeout_s=120)
        assert "dashboard=200" in _ray_cli("exec", str(config),
                                           dashboard + f" -H 'Authorization: Bearer {token}'", timeout_s=120)
        assert not _port_open(head.ip, 8265)  # not on the head's network address at all

        out = _ray_cli("exec", str(config), "cd ~/maverick && maverick serve ~/serve.yaml --address auto --detach",
                       timeout_s=600)
        assert "maverick: detached" in out
        status, answer = _http(f"http://{head.ip}:8000/v1/completions",
                               {"model": "tiny-maverick", "prompt": "The cluster is", "max_tokens": 5})
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] == 5 and answer["choices"][0]["finish_reason"] == "length"
        # the gang really spans both hosts: rank actors run in the worker host's namespaces
        assert any(name.startswith("ray::") and "Worker" in name
                   for name in _ray_processes(hosts.processes_on(worker))), _ray_processes(hosts.processes_on(worker))
        # Ray's metrics agent answers on the fixed port the config gives it, on each host
        for host in hosts.hosts:
            assert _http(f"http://{host.ip}:8080/metrics")[0] == 200
    finally:
        _ray_cli("down", "-y", str(config), timeout_s=300)
        for leftover in Path("/tmp/ray").glob(f"cluster-{CLUSTER}.*"):  # the local provider's node list
            leftover.unlink()
    # `ray down` stops the head; a worker host's raylet, and with it every task and actor process there,
    # exits once the head's GCS has been gone for RECONNECT_S. Ray's node agents exit ~60 s after it on
    # their own (110 s after `ray down` in a watched run): not waited for, the host's namespace ends them.
    for host in hosts.hosts:
        wait_until(lambda: not [n for n in _ray_processes(hosts.processes_on(host)) if n not in RAY_NODE_AGENTS],
                   180, f"Ray's processes gone from {host.name} after `ray down`")
