"""`make serve` / `make observe` as a user runs them: the embedded default answers a chat request,
Prometheus sees it, SIGTERM drains and exits 0.

Runs the checkout's `.venv` (make skips the install when it is up to date) on a free port; the tiny
checkpoint is written to `checkpoints/tiny-maverick` on first start, as on a fresh machine.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster.probe import wait_until

from tests.router.conftest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
MAVERICK = str(Path(sys.executable).with_name("maverick"))

pytestmark = pytest.mark.timeout(600)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_make_serve_is_make_observe_without_prometheus():
    """The two targets differ by `--observe` alone, so the test below, run through `make observe`, covers both."""
    def command(target: str) -> str:
        return subprocess.run(["make", "-n", "-s", target], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]

    assert command("observe") == command("serve").replace("deploy/tiny-cpu.yaml", "deploy/tiny-cpu.yaml --observe")


def test_make_observe_answers_chat_prometheus_sees_it_and_sigterm_drains_and_exits_0(tmp_path):
    """One start of the embedded default, as a user runs it, for everything a first hour touches (a
    server start costs half a minute on 2 cores)."""
    from cluster.observe import PrometheusClient

    port, prom_port = free_port(), free_port()
    log_path = tmp_path / "observe.log"
    log = open(log_path, "w")
    make = subprocess.Popen(["make", "-s", "observe", f"SERVE_ARGS=--http-port {port} --prometheus-port {prom_port}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                            start_new_session=True)  # its own process group: killpg below spares pytest
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        def printed_prometheus() -> bool:
            assert make.poll() is None, log_path.read_text()[-3000:]
            return f"Prometheus: {prom_url}" in log_path.read_text()

        wait_until(printed_prometheus, 400, "the printed endpoints and Prometheus URL", poll_s=1.0)
        printed = log_path.read_text()
        assert "maverick: ready" in printed and f"http://127.0.0.1:{port}/v1" in printed
        # not a terminal: plain progress lines, every stage of the gang's start-up in order, before "ready"
        progress = [line for line in printed[:printed.index("maverick: ready")].splitlines()
                    if re.match(r"gang [0-9a-z]+  ", line)]  # "gang <its id>  <stage>  ..."
        stages = [line.split("  ")[1].strip() for line in progress]
        assert list(dict.fromkeys(stages)) == ["placement", "process group", "weights", "warm-up", "ready"], printed
        assert "[##########]" in progress[-1] and "ranks 3/3" in progress[-1] and "\r" not in printed
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=30)

        body = {"model": "tiny-maverick", "prompt": [2016, 5, 6], "max_tokens": 8, "ignore_eos": True}
        prom = PrometheusClient(prom_url)
        for expected in (24, 48):  # a second round once Prometheus has the first: rates need two samples
            for _ in range(3):
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                             {"content-type": "application/json"})
                assert json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]["completion_tokens"] == 8
            # Ray reports every 5 s, Prometheus scrapes every 5 s
            wait_until(lambda: (prom.value("sum(ray_maverick_generation_tokens_total)") == expected and
                                prom.value('sum(maverick_generation_tokens_total{job="maverick-serve"})') == expected
                                and prom.value("sum(ray_maverick_expert_tokens_total)")),
                       120, f"Prometheus to count {expected} tokens", poll_s=2.0)
        top = subprocess.run([MAVERICK, "top", "--prometheus", prom_url, "--once"], capture_output=True, text=True,
                             timeout=60)
        assert top.returncode == 0, top.stderr
        assert "gang-" in top.stdout and "ready" in top.stdout and "hottest experts: #" in top.stdout, top.stdout
        plain = subprocess.run([MAVERICK, "top", "--url", f"http://127.0.0.1:{port}", "--once", "--interval", "0.5"],
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode == 0 and "gang-" in plain.stdout and "ok 6" in plain.stdout, plain.stdout

        chat = {"model": "tiny-maverick", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(chat).encode(),
                                     {"content-type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1
        serve_pids = _children(make.pid)
        assert len(serve_pids) == 1, serve_pids
        # the ingress replica runs its handlers on Serve's own loop (router/app.py INGRESS_ENV)
        titles = {p: (p.info["cmdline"] or [""])[0] for p in psutil.process_iter(["cmdline"])}
        ingress = [p for p, title in titles.items() if title.startswith("ray::ServeReplica:") and "ingress" in title]
        assert len(ingress) == 1 and ingress[0].environ().get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD") == "0"

        # a request in flight when SIGTERM arrives still finishes; readiness turns false meanwhile
        long = {"model": "tiny-maverick", "prompt": [2016, 5, 6], "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(long).encode(),
                                     {"content-type": "application/json"})
        stream = urllib.request.urlopen(req, timeout=120)
        assert stream.readline().startswith(b"data: ")
        os.kill(serve_pids[0], signal.SIGTERM)  # what a process manager sends the server
        time.sleep(1.0)
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=10)
        assert not_ready.value.code == 503
        events = [line for line in stream.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert make.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        output = log_path.read_text()  # what the user saw: the drain, then the exit
        assert "maverick: draining" in output and "killed by `ray.kill`" not in output, output[-3000:]
        with pytest.raises(OSError):  # prometheus went with it
            urllib.request.urlopen(prom_url + "/-/ready", timeout=5)
    finally:
        if make.poll() is None:
            os.killpg(os.getpgid(make.pid), signal.SIGKILL)
        log.close()


def test_serve_rejects_a_bad_config_before_starting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "deploy/tiny-cpu.yaml").read_text().replace("expert_workers: 2", "expert_worker: 2"))
    started = time.monotonic()
    proc = subprocess.run([MAVERICK, "serve", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "applications[0].args.expert_worker" in proc.stderr
    assert time.monotonic() - started < 60  # no Ray was started
