"""`maverick serve CONFIG.yaml` and `maverick serve --model DIR`: deploy, show each gang's start-up
(stage, bytes loaded, ranks up) until ready, print the endpoints, serve in the foreground;
SIGINT/SIGTERM drain (readiness false, in-flight requests finish within the grace period) and exit 0.
A replica that dies is Serve's to restart: the unhealthy application is reported and waited for; one
that fails to deploy, or stays unhealthy past --unhealthy-timeout, exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("maverick.serve")
# a dead gang replica's successor builds the gang again: a whole Maverick checkpoint read at a few hundred MB/s
UNHEALTHY_TIMEOUT_S = 1800


def _resolve(data: dict, args: argparse.Namespace) -> tuple[dict, str, int]:
    """Apply CLI overrides, validate everything, make model paths absolute (and tiny ones exist)."""
    from cluster.serve_config import GRPC_SERVICER, validate_serve_config
    from router.app import prepare_args

    http = data.setdefault("http_options", {})
    if args.host is not None:
        http["host"] = args.host
    if args.http_port is not None:
        http["port"] = args.http_port
    http.setdefault("host", "127.0.0.1")  # Serve's file default is 0.0.0.0: never expose by accident
    if args.grpc_port is not None:
        grpc_options = data.setdefault("grpc_options", {})
        grpc_options["port"] = args.grpc_port
        grpc_options.setdefault("grpc_servicer_functions", [GRPC_SERVICER])
    if not args.address:  # a local Ray: its front binds here, so a taken port fails now, not in HAProxy
        _check_ports_free(http["host"], int(http.get("port", 8000)), _grpc_port(data))
    api_key = args.api_key or os.environ.get("MAVERICK_API_KEY")
    _, apps = validate_serve_config(data, args.config or "flags")
    for app, parsed in zip(data["applications"], apps):
        if parsed is None:
            continue
        if api_key and parsed.api_key is None:
            app["args"]["api_key"] = api_key
        resolved = prepare_args(app["args"])
        app["args"] = resolved.model_dump(exclude_defaults=True) | {"model": resolved.model,
                                                                    "served_model_name": resolved.model_name}
    return data, http["host"], int(http.get("port", 8000))


def _check_ports_free(host: str, http_port: int, grpc_port: int | None) -> None:
    import socket

    # Serve binds gRPC on every interface
    for name, flag, addr, port in (("HTTP", "--http-port", host, http_port), ("gRPC", "--grpc-port", "", grpc_port)):
        if port is None:
            continue
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                s.bind((addr, port))
            except OSError as exc:
                where = f" on {addr}" if addr else ""
                raise SystemExit(f"maverick: error: {name} port {port}{where} is not free ({exc.strerror}): another "
                                 f"server holds it; choose another with {flag} PORT") from None


def _grpc_port(data: dict) -> int | None:
    grpc_options = data.get("grpc_options") or {}
    return grpc_options.get("port", 9000) if grpc_options.get("grpc_servicer_functions") else None


STATUS_POLL_S = 5.0  # Serve's status, read while serving: each read is a controller round trip


def _read_apps() -> dict | Exception:
    """Serve's application and deployment statuses, or why the controller did not answer. A light read:
    `serve.status()` also builds every deployment's config (cloudpickling its request router) in this
    process and reads the config checkpoint in the controller, ~1% of a core each at one read per 5 s."""
    from types import SimpleNamespace

    from ray.serve.context import _get_global_client  # Serve 2.60: the only status read without configs

    try:
        overviews = _get_global_client().list_serve_statuses()
    except Exception as exc:  # the controller restarting: Serve brings it back as it does replicas
        return exc
    return {o.name: SimpleNamespace(status=o.app_status.status, message=o.app_status.message,
                                    deployments={d.name: d for d in o.deployment_statuses}) for o in overviews}


def _read_details() -> dict | Exception:
    """Serve's full status (replica states included)."""
    from ray import serve

    try:
        return serve.status().applications
    except Exception as exc:
        return exc


def _app_status(apps: dict | Exception) -> tuple[str, str]:
    if isinstance(apps, Exception):
        return "UNREACHABLE", f"Serve's controller does not answer ({type(apps).__name__})"
    for state in ("DEPLOY_FAILED", "UNHEALTHY"):
        for name, status in apps.items():
            if status.status == state:
                return state, f"{name}: {status.message}{_cause(status)}"
    return "OK", ""


def _cause(app_status) -> str:
    """The exception a failing deployment raised (the last line of its message, which holds the
    traceback): the application's own message only names the deployment."""
    causes = []
    for name, deployment in app_status.deployments.items():
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if str(deployment.status).endswith(("UNHEALTHY", "DEPLOY_FAILED")) and lines:
            causes.append(f"{name}: {lines[-1]}")
    return "".join(f"\n  {cause}" for cause in causes)


def _gangs_running(apps: dict | Exception) -> int | None:
    """Gang replicas running over every application, None if unknown."""
    if isinstance(apps, Exception):
        return None
    running = 0
    for status in apps.values():
        gangs = status.deployments.get("gangs")
        if gangs is not None:
            running += sum(n for state, n in gangs.replica_states.items() if str(state).endswith("RUNNING"))
    return running


class GangCount:
    """Says each change of the running gang count (autoscaling, or a gang replaced) once."""

    def __init__(self, say=None, read_details=_read_details):
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.read_details = read_details
        self.last: int | None = None
        self.states: tuple | None = None  # every deployment's state at the last full read

    def follow(self, apps: dict | Exception) -> None:
        """The full status is read at every light read while some deployment is not HEALTHY (gangs
        come up one by one inside one UPSCALING), and once after each change; a service steady and
        HEALTHY costs light reads only."""
        if isinstance(apps, Exception):
            return
        states = tuple(sorted((app, name, str(d.status), str(getattr(d, "status_trigger", "")))
                              for app, status in apps.items() for name, d in status.deployments.items()))
        healthy = all(status.rsplit(".", 1)[-1] == "HEALTHY" for _, _, status, _ in states)
        if healthy and states == self.states:
            return
        running = _gangs_running(self.read_details())
        if running is not None:  # else read again at the next light read
            self.states = states
            self.update(running)

    def update(self, running: int | None) -> None:
        if running is None or running == self.last:
            return
        if self.last is not None:
            self.say(f"maverick: gangs running: {self.last} -> {running}")
        self.last = running


class AttentionRanks:
    """Says each change of a gang's attention ranks (attention_scaling) once, read from the serving
    port's /metrics (`maverick_gang_attention_ranks`, per gang)."""

    def __init__(self, metrics_url: str, api_key: str | None, say=None):
        self.metrics_url, self.api_key = metrics_url, api_key
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.last: dict[str, int] = {}

    def read(self) -> dict[str, int]:
        import urllib.request

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.metrics_url, headers=headers), timeout=5) as r:
                text = r.read().decode()
        except Exception:  # busy or restarting: the next read says it
            return {}
        return _attention_gauges(text)

    def update(self, now: dict[str, int]) -> None:
        for gang, ranks in sorted(now.items()):
            before = self.last.get(gang)
            if before is not None and before != ranks:
                self.say(f"maverick: {gang} attention ranks: {before} -> {ranks}")
        self.last.update(now)


def _attention_gauges(text: str) -> dict[str, int]:
    """gang -> attention ranks, from Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith("maverick_gang_attention_ranks{") and 'gang="' in line:
            gang = line.split('gang="', 1)[1].split('"', 1)[0]
            out[gang] = int(float(line.rsplit(" ", 1)[1]))
    return out


class AppWatch:
    """Serve restarts a dead replica by itself, so an unhealthy application is reported and waited for;
    only one that failed to deploy, or stays unhealthy past `patience_s`, is a reason to stop."""

    def __init__(self, patience_s: float, say=None):
        self.patience_s = patience_s
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.unhealthy_since: float | None = None

    def healthy_enough(self, state: str, message: str, now: float) -> bool:
        """False once the application cannot recover; says each change of state once."""
        if state == "DEPLOY_FAILED":
            self.say(f"maverick: deployment failed: {message}")
            return False
        if state == "OK":
            if self.unhealthy_since is not None:
                self.say(f"maverick: application recovered after {now - self.unhealthy_since:.0f}s")
                self.unhealthy_since = None
            return True
        if self.unhealthy_since is None:
            self.unhealthy_since = now
            self.say(f"maverick: application unhealthy: {message}; waiting up to {self.patience_s:g}s "
                     "for Serve to restart its replicas")
        elif now - self.unhealthy_since > self.patience_s:
            self.say(f"maverick: application still unhealthy after {self.patience_s:g}s: {message}; stopping")
            return False
        return True


def _startup_snapshots(board) -> list:
    """Every gang's latest start-up snapshot; none if the board does not answer (progress is optional)."""
    import ray

    try:
        return ray.get(board.snapshots.remote(), timeout=5)
    except Exception as exc:
        log.info("no start-up progress: %s", exc)
        return []


def run_serve(args: argparse.Namespace) -> int:
    if bool(args.config) == bool(args.model):
        raise SystemExit("give a Serve config file or --model DIR (not both)")
    if args.detach and not args.address:  # a local Ray started here would stop with this process
        raise SystemExit("--detach needs --address (a running cluster, e.g. one from `ray up`)")
    from cluster.serve_config import config_from_flags, load_serve_config

    data = load_serve_config(args.config) if args.config else config_from_flags(args)
    data, host, port = _resolve(data, args)

    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from cluster.local_ray import ensure_local_ray
    from cluster.probe import http_ok
    from cluster.startup import open_board
    from cluster.terminal import StartupDisplay

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ensure_local_ray(dashboard=args.observe, metrics_export_port=args.metrics_export_port,
                         proxy=_local_proxy(args.proxy, data["http_options"].get("host")))
    schema = ServeDeploySchema.model_validate(data)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                         grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
    if client.http_config.port != port:  # Serve already ran here: it keeps its ports and ignores ours
        print(f"maverick: error: Serve already runs on this cluster with HTTP port {client.http_config.port}; "
              f"pass --http-port {client.http_config.port} or stop it (`serve shutdown -y`)", file=sys.stderr)
        ray.shutdown()
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    board = open_board()  # before deploying: every gang pushes its start-up stages there
    client.deploy_apps(schema, _blocking=False)
    url = f"http://{host}:{port}"
    prometheus = None
    started = time.monotonic()
    code = 0
    display = StartupDisplay(sys.stderr)
    watch = AppWatch(args.unhealthy_timeout)
    while not stop.is_set() and not http_ok(url + "/health/ready"):
        if not watch.healthy_enough(*_app_status(_read_apps()), time.monotonic()):
            code = 1
            break
        display.update(_startup_snapshots(board))
        stop.wait(0.5)
    if code == 0 and not stop.is_set():
        display.update(_startup_snapshots(board))  # the "ready" lines
    display.close()
    ray.kill(board)  # its job is over: an idle actor still costs CPU (a rebuilt gang's supervisor finds none)
    if code == 0 and not stop.is_set():
        print(_banner(data, url, host, time.monotonic() - started), flush=True)
        if args.detach:  # Serve's applications outlive this driver: leave them running
            print("maverick: detached; stop with `serve shutdown -y`", flush=True)
            ray.shutdown()
            return 0
        if args.observe:
            prometheus = _start_prometheus(args, f"{host}:{port}", _api_key_of(data))
            print(f"  Prometheus: {prometheus.url}  (maverick top --prometheus {prometheus.url})", flush=True)
        gangs = GangCount()
        scaling = any(app.get("args", {}).get("attention_scaling") for app in data["applications"])
        attention = AttentionRanks(url + "/metrics", _api_key_of(data)) if scaling else None
        while not stop.wait(STATUS_POLL_S):
            apps = _read_apps()
            if not watch.healthy_enough(*_app_status(apps), time.monotonic()):
                code = 1
                break
            gangs.follow(apps)
            if attention is not None:
                attention.update(attention.read())
    if stop.is_set():
        _drain(float(args.grace_period))
    if prometheus is not None:
        prometheus.stop()
    if args.address:  # someone else's cluster: take our applications away, leave Serve and the rest
        for app in data["applications"]:
            serve.delete(app["name"])
    # NOTE: a local Ray started here goes down whole with ray.shutdown(); serve.shutdown() first
    # would only add Ray's "graceful_shutdown failed ... killed by ray.kill" retry warnings
    ray.shutdown()
    print("maverick: stopped", file=sys.stderr, flush=True)
    return code


def _banner(data: dict, url: str, host: str, took_s: float) -> str:
    """What a client needs: the model name(s) to send, where, and whether a key is required."""
    from cluster.serve_config import APP_NAME

    apps = [app["args"] for app in data["applications"] if app.get("args")]
    names = ", ".join(f"`{a['served_model_name']}`" for a in apps if a.get("served_model_name")) or "-"
    keyed = any(a.get("api_key") or a.get("api_key_env") for a in apps)
    lines = [f"maverick: ready in {took_s:.0f}s",
             f"  model: {names}  (the `model` field of each request)",
             f"  OpenAI API: {url}/v1  (health: {url}/health, readiness: {url}/health/ready)"]
    if _grpc_port(data) is not None:
        lines.append(f"  gRPC maverick.v1.Generation: {host}:{_grpc_port(data)}  (metadata application={APP_NAME})")
    lines += [f"  Prometheus metrics: {url}/metrics",
              "  API key: required (Authorization: Bearer KEY, the --api-key or MAVERICK_API_KEY value)" if keyed
              else "  API key: none required"]
    return "\n".join(lines)


def _local_proxy(proxy: str, host: str | None) -> str:
    """HAProxy unless the HTTP host is one it cannot serve: in Ray 2.60 a replica binds its own port on
    `http_options.host` and HAProxy dials 127.0.0.1 on its node, so only loopback or every interface work."""
    if proxy == "haproxy" and host not in (None, "127.0.0.1", "localhost", "0.0.0.0", "::"):
        print(f"maverick: HTTP host {host}: Serve's HAProxy mode serves only 127.0.0.1 or 0.0.0.0 in Ray 2.60; "
              "using Serve's Python proxy", file=sys.stderr, flush=True)
        return "python"
    return proxy


def _api_key_of(data: dict) -> str | None:
    return next((app["args"].get("api_key") for app in data["applications"] if app.get("args")), None)


def _start_prometheus(args: argparse.Namespace, serve_target: str, api_key: str | None):
    """Debian's prometheus on 127.0.0.1, scraping this local Ray (service discovery) and the serving port."""
    import tempfile
    from pathlib import Path

    import ray

    from cluster.observe import Prometheus, scrape_config

    work = Path(tempfile.mkdtemp(prefix="maverick-prometheus-"))
    key_file = None
    if api_key:
        key_file = work / "api_key"
        key_file.write_text(api_key)
        key_file.chmod(0o600)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    config = scrape_config(serve_target, sd_file=session / "prom_metrics_service_discovery.json",
                           interval_s=5, api_key_file=key_file)
    return Prometheus(work, args.prometheus_port, config).start()


def _drain(grace_s: float) -> None:
    """Readiness false and new requests refused; wait for in-flight ones up to the grace period."""
    from ray import serve

    from cluster.serve_config import APP_NAME

    print("maverick: draining", file=sys.stderr, flush=True)
    # the handle below makes Serve log an INFO "Started <...LongPollClient>": not news during a shutdown
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        handle = serve.get_app_handle(APP_NAME)
        # to every ingress replica (a plain call reaches one), again each round: one Serve starts meanwhile
        # drains too; a replica that does not answer holds nothing to wait for
        def drain_all() -> int:
            return sum(n for n in handle.broadcast("drain").results(timeout_s=10, return_exceptions=True)
                       if isinstance(n, int))

        pending = drain_all()
        deadline = time.monotonic() + grace_s
        while pending and time.monotonic() < deadline:
            time.sleep(0.5)
            pending = drain_all()
        if pending:
            print(f"maverick: {pending} request(s) still running after {grace_s:g}s; stopping",
                  file=sys.stderr)
    except Exception as exc:  # no app of ours (a foreign YAML) or already gone: nothing to drain
        log.info("drain skipped: %s", exc)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Append a flag's default unless its help already says it (flags with no value are off by default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default == argparse.SUPPRESS:
            return text
        if action.default is False:
            return text + " (default: off)"
        return super()._get_help_string(action)


def add_serve_parser(sub) -> None:
    from cluster.config import AppConfig, EngineLimits

    limits = EngineLimits()  # the help shows the defaults a deployment really gets
    p = sub.add_parser("serve", help="serve a Serve config file or one model directory over HTTP",
                       formatter_class=_HelpWithDefaults,
                       description="Serve a deployment YAML (e.g. deploy/tiny-cpu.yaml) or one model directory "
                                   "(--model) on a local Ray, or on a running cluster with --address.")
    p.add_argument("config", nargs="?", help="a Serve config YAML (e.g. deploy/tiny-cpu.yaml)")
    p.add_argument("--model", help="local Hugging Face model directory, instead of a YAML (default: none)")
    p.add_argument("--address", help="an existing Ray cluster, e.g. auto (default: start a local one)")
    p.add_argument("--host", help="HTTP bind address (default: the YAML's http_options.host, else 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (default: the YAML's http_options.port, else 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default: the YAML's grpc_options.port, else 9000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but the health probes "
                                     "(default: MAVERICK_API_KEY if set, else no key)")
    p.add_argument("--proxy", choices=["haproxy", "python"], default="haproxy",
                   help="Serve's front on a local Ray: HAProxy straight to the ingress replicas (HTTP host "
                        "127.0.0.1 or 0.0.0.0) or Serve's Python proxy actor; with --address the "
                        "cluster's own setting (RAY_SERVE_ENABLE_HA_PROXY=1 on `ray start`) decides")
    p.add_argument("--grace-period", type=float, default=30, help="seconds in-flight requests get on shutdown")
    p.add_argument("--unhealthy-timeout", type=float, default=UNHEALTHY_TIMEOUT_S,
                   help="seconds the application may stay unhealthy (Serve restarting a dead replica; a gang "
                        "replica reloads its weights) before maverick serve gives up and stops")
    p.add_argument("--detach", action="store_true",
                   help="exit once ready and leave the application running (with --address: a cluster from `ray up`)")
    p.add_argument("--observe", action="store_true",
                   help="also start Debian's prometheus on 127.0.0.1 against this local cluster and print its URL")
    p.add_argument("--prometheus-port", type=int, default=9090, help="with --observe: Prometheus's port")
    p.add_argument("--metrics-export-port", type=int,
                   help="a fixed port for Ray's metrics agent, for static Prometheus targets (default: Ray picks one)")
    m = p.add_argument_group("with --model", "the application's args (a YAML sets these in its own args)")
    m.add_argument("--served-model-name", help="the name clients send as `model` (default: --model as given)")
    m.add_argument("--attention-workers", type=int, default=1, help="attention workers per gang")
    m.add_argument("--expert-workers", type=int, default=0,
                   help="expert workers per gang (0: the attention workers hold every expert)")
    m.add_argument("--num-gangs", type=int, help="gangs behind one ingress (default 1; with --max-gangs: at start, "
                                                 "default --min-gangs)")
    m.add_argument("--min-gangs", type=int, help="autoscaling: the fewest gangs (default 1)")
    m.add_argument("--max-gangs", type=int, help="autoscaling: the most gangs; gangs follow load between the bounds "
                                                 "(default: none, the gang count is fixed)")
    m.add_argument("--target-load", type=float,
                   help="autoscaling: requests per gang wanted, as a fraction of its capacity "
                        "(max_num_seqs x attention workers; default 0.75)")
    m.add_argument("--max-attention-workers", type=int,
                   help="attention scaling: a running gang adds attention ranks up to this many when its KV cache "
                        "or queue is high, and gives them back when quiet, down to --attention-workers (default: "
                        "none, the count is fixed; needs --expert-workers; the YAML's attention_scaling sets the "
                        "thresholds)")
    m.add_argument("--spares", type=int,
                   help="warm expert-rank processes kept started beside each gang: a failed expert rank is replaced "
                        "by one, so recovery costs its weights, not a process start (default 0; needs "
                        "--expert-workers; CPU (gloo) gangs only for now)")
    m.add_argument("--attention-spares", type=int,
                   help="warm attention-rank processes kept started beside each gang, as --spares for attention "
                        "ranks (default 0; needs --expert-workers; CPU (gloo) gangs only for now)")
    m.add_argument("--migration-limit", type=int,
                   help=f"times a request moves on when its gang fails (default "
                        f"{AppConfig.model_fields['migration_limit'].default}; 0: it fails with 503)")
    m.add_argument("--max-model-len", type=int,
                   help="longest prompt + output in tokens (default: the checkpoint's limit, capped by the KV cache)")
    m.add_argument("--max-num-seqs", type=int,
                   help=f"sequences one attention worker runs at once (default {limits.max_num_seqs})")
    m.add_argument("--max-num-batched-tokens", type=int,
                   help=f"tokens one engine step computes, prefill chunks included "
                        f"(default {limits.max_num_batched_tokens})")
    m.add_argument("--kv-cache-memory", type=int,
                   help=f"bytes of K/V per attention worker (default {limits.kv_cache_memory})")
    m.add_argument("--dtype", help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    m.add_argument("--torch-threads", type=int, default=1, help="intra-op threads per attention worker")
    m.add_argument("--skip-tokenizer-init", action="store_true", help="token ids in and out, no tokenizer")
    m.add_argument("--redundant-experts", type=int,
                   help="eplb: spare expert slots per expert rank, filled with copies of hot experts "
                        "(default: none, eplb off; needs --expert-workers)")
    m.add_argument("--rebalance-every-steps", type=int,
                   help="eplb: steps between live rebalances from measured load (default: 0, the start "
                        "placement stays)")
    m.add_argument("--weight-read-rows", type=float,
                   help="eplb: one expert's weight read in rows of compute; above 0 the policy copies a hot "
                        "expert only where the rows it moves outweigh the copy's reads (default: 0, balance "
                        "rows; `maverick plan` gives the value for a GPU)")
    p.set_defaults(func=run_serve)
