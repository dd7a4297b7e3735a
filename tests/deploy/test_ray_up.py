"""`ray up` that works the first time, for real: deploy/ray/onprem.yaml against a real sshd on a
loopback address, `ray up -y`, `maverick serve deploy/tiny-cpu.yaml --address auto --detach` through
`ray exec`, an OpenAI request answered, token auth refusing a client without the token, `ray down -y`,
nothing left running.

What differs from the shipped file, and why: the hosts and the SSH login (this machine); the token's
local path (made here, not the operator's ~/.ray/auth_token); and the install steps: the venv this test
runs in is linked instead of pip-installing torch from the registry again (minutes). Everything else
(file mounts with the .gitignore filter, the environment line, the start commands) runs verbatim.
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
from tests.deploy.sshd import Sshd

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
HEAD = "127.0.0.29"
CLUSTER = "maverick-rayup-test"
RAY_DAEMONS = ("gcs_server", "raylet")


def _ray_daemons() -> list[str]:
    """Ray's daemons and worker processes (workers are named `ray::<actor or task>`)."""
    return [p.info["name"] for p in psutil.process_iter(["name"])
            if p.info["name"] in RAY_DAEMONS or (p.info["name"] or "").startswith("ray::")]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _cluster_config(sshd: Sshd, token_file: Path) -> Path:
    config = yaml.safe_load((REPO / "deploy" / "ray" / "onprem.yaml").read_text())
    config["cluster_name"] = CLUSTER
    config["provider"].update(head_ip=HEAD, worker_ips=[])
    config["auth"] = {"ssh_user": "maverick-rayup", "ssh_private_key": str(sshd.client_key)}
    config["file_mounts"] = {"~/maverick": str(REPO), "~/.ray/auth_token": str(token_file)}
    environment = [c for c in config["setup_commands"] if "maverick-env" in c]
    assert len(environment) == 1
    config["setup_commands"] = environment + [f"ln -sfn {Path(sys.prefix)} ~/maverick-venv"]
    path = sshd.root / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ray_cli(*args: str, timeout_s: float) -> str:
    done = subprocess.run([str(RAY), *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    assert not _ray_daemons(), "another Ray runs on this machine: `ray stop` in the config would kill it"
    server = Sshd(tmp_path_factory.mktemp("rayup"), HEAD).start()
    try:
        wait_until(server.listening, 30, "sshd listening")
        yield server
    finally:
        server.stop()


def test_ray_up_serve_and_down(sshd):
    token = secrets.token_hex(16)
    token_file = sshd.root / "auth_token"
    token_file.write_text(token + "\n")
    config = _cluster_config(sshd, token_file)
    try:
        _ray_cli("up", "-y", "--no-config-cache", str(config), timeout_s=600)
        # what the file mounts and the .gitignore filter shipped: the project, no venv, no checkpoints
        shipped = sshd.home / "maverick"
        assert (shipped / "router" / "app.py").exists() and not (shipped / ".venv").exists()
        assert (sshd.home / ".ray" / "auth_token").read_text().strip() == token

        # the dashboard is on 127.0.0.1 and refuses a client without the token
        assert _status("http://127.0.0.1:8265/api/version") == 401
        assert _status("http://127.0.0.1:8265/api/version", {"Authorization": f"Bearer {token}"}) == 200

        out = _ray_cli("exec", str(config),
                       "cd ~/maverick && maverick serve deploy/tiny-cpu.yaml --address auto --detach",
                       timeout_s=600)
        assert "maverick: detached" in out
        body = json.dumps({"model": "tiny-maverick", "prompt": "The cluster is", "max_tokens": 5}).encode()
        request = urllib.request.Request("http://127.0.0.1:8000/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        assert answer["usage"]["completion_tokens"] == 5 and answer["choices"][0]["finish_reason"] == "length"
        # Ray's metrics agent answers on the fixed port the config gives it (static Prometheus targets)
        assert _status("http://127.0.0.1:8080/metrics") == 200
    finally:
        _ray_cli("down", "-y", str(config), timeout_s=300)
        for leftover in Path("/tmp/ray").glob(f"cluster-{CLUSTER}.*"):  # the local provider's node list
            leftover.unlink()
    wait_until(lambda: not _ray_daemons(), 60, "Ray's daemons and workers gone after `ray down`")
    wait_until(lambda: not any(_port_open(port) for port in (6379, 8000, 8080, 8265, 9000)), 60,
               "Ray's and Serve's ports closed after `ray down`")
