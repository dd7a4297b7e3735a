"""`maverick top`: a live terminal view of a running deployment.

From Prometheus (`--prometheus URL`, the whole picture: gangs, throughput, latency percentiles, KV
use, the hottest experts, rank imbalance and, with eplb, balancedness and rebalances), or else from
the serving port's `/metrics` (requests, tokens, latency and gang state; rates and percentiles from
the change between two refreshes).
"""

from __future__ import annotations

import math
import os
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict

from cluster.observe import PrometheusClient


def _fmt(value: float | None, unit: str = "", scale: float = 1.0) -> str:
    if value is None or math.isnan(value) or math.isinf(value):
        return "-"
    return f"{value * scale:.1f}{unit}"


class PrometheusSource:
    def __init__(self, url: str, application: str, window: str):
        self.prom = PrometheusClient(url)
        self.app = f'application=~"{application}"'
        self.window = window

    def _by(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.prom.query(promql)}

    def _one(self, promql: str) -> float | None:
        return self.prom.value(promql)

    def lines(self) -> list[str]:
        a, w = self.app, self.window
        # a gang that left (scaled down) keeps its last series, "stopped": not listed
        states = self.prom.query(f'max by (gang, state) (ray_maverick_gang_state{{{a},state!="stopped"}}) > 0')
        restarts = self._by(f"max by (gang) (ray_maverick_gang_restarts{{{a}}})", "gang")
        attention = self._by(f"max by (gang) (ray_maverick_gang_attention_ranks{{{a}}})", "gang")
        running = self._by(f"sum by (gang) (ray_maverick_num_requests_running{{{a}}})", "gang")
        waiting = self._by(f"sum by (gang) (ray_maverick_num_requests_waiting{{{a}}})", "gang")
        kv = self.prom.query(f"max by (gang, group) (ray_maverick_kv_cache_usage_perc{{{a}}})")
        kv_by_gang = defaultdict(list)
        for r in kv:
            kv_by_gang[r["metric"].get("gang", "")].append(
                f"{r['metric'].get('group', '').split('_')[0]} {float(r['value'][1]):.0%}")
        out = [f"{'gang':<13} {'state':<11} {'attn':>4} {'restarts':>8} {'running':>8} {'waiting':>8}  KV in use"]
        for r in sorted(states, key=lambda r: r["metric"].get("gang", "")):
            g = r["metric"].get("gang", "")
            kv_in_use = ", ".join(kv_by_gang.get(g, [])) or "-"
            ranks = f"{attention[g]:.0f}" if g in attention else "-"
            out.append(f"{g:<13} {r['metric'].get('state', ''):<11} {ranks:>4} "
                       f"{restarts.get(g, 0):>8.0f} {running.get(g, 0):>8.0f} {waiting.get(g, 0):>8.0f}  {kv_in_use}")
        out += self._gangs_lines() + self._attention_lines()

        def q(metric: str, p: float) -> float | None:
            return self._one(f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket{{{a}}}[{w}])))")

        tok_s = self._one(f"sum (rate(ray_maverick_generation_tokens_total{{{a}}}[{w}]))")
        outcomes = self._by(f"sum by (outcome) (rate(ray_maverick_requests_total{{{a}}}[{w}]))", "outcome")
        out += ["", f"generation {_fmt(tok_s, ' tok/s')}   requests/s: " +
                (", ".join(f"{k} {v:.2f}" for k, v in sorted(outcomes.items())) or "-"),
                f"TTFT p50 {_fmt(q('ray_maverick_time_to_first_token_seconds', 0.5), ' ms', 1e3)}  "
                f"p99 {_fmt(q('ray_maverick_time_to_first_token_seconds', 0.99), ' ms', 1e3)}   "
                f"TPOT p50 {_fmt(q('ray_maverick_inter_token_latency_seconds', 0.5), ' ms', 1e3)}  "
                f"p99 {_fmt(q('ray_maverick_inter_token_latency_seconds', 0.99), ' ms', 1e3)}"]
        hot = self.prom.query(f"topk(5, sum by (expert) (increase(ray_maverick_expert_tokens_total{{{a}}}[{w}])))")
        layer_rank = f"sum by (layer, rank) (increase(ray_maverick_expert_rank_layer_tokens_total{{{a}}}[{w}]))"
        imbalance = self._by(f"max by (layer) ({layer_rank}) / avg by (layer) ({layer_rank})", "layer")
        out.append("hottest experts: " + (", ".join(
            f"#{r['metric'].get('expert')} {float(r['value'][1]):.0f}" for r in hot) or "-") + f" tokens in {w}")
        out.append("rank imbalance (max/mean) by layer: " + (", ".join(
            f"L{k} {v:.2f}" for k, v in sorted(imbalance.items(), key=lambda kv: int(kv[0]))
            if not math.isnan(v)) or "-"))
        out += self._eplb_lines()
        return out

    def _gangs_lines(self) -> list[str]:
        """With autoscaling: what Serve's controller wants beside what serves, and what it changed."""
        a = self.app
        wanted = self._one(f'max (ray_serve_autoscaling_desired_replicas{{{a},deployment="gangs"}})')
        if wanted is None:
            return []
        ready = self._one(f"count (max by (gang) (ray_maverick_gang_ready{{{a}}}) == 1)") or 0
        moves = self._by(f"sum by (direction) (increase(ray_maverick_gang_scaling_events_total{{{a}}}[1h]))",
                         "direction")
        return [f"gangs: {ready:.0f} ready, {wanted:.0f} wanted (autoscaling); scaled up {moves.get('up', 0):.0f}, "
                f"down {moves.get('down', 0):.0f} in the last hour"]

    def _attention_lines(self) -> list[str]:
        """Only for gangs with attention_scaling, once one of them changed its attention side."""
        events = f"ray_maverick_attention_scaling_events_total{{{self.app}}}"
        moves = self._by(f"sum by (direction) (increase({events}[1h]))", "direction")
        if not moves:
            return []
        return [f"attention ranks: added {moves.get('up', 0):.0f}, removed {moves.get('down', 0):.0f} in the last hour"]

    def _eplb_lines(self) -> list[str]:
        """Only for gangs with eplb: its series exist from a gang's first rebalance decision."""
        a, w = self.app, self.window
        balancedness = defaultdict(dict)  # layer -> placement -> the worst gang's value
        for r in self.prom.query(f"min by (layer, placement) (ray_maverick_eplb_balancedness{{{a}}})"):
            balancedness[r["metric"].get("layer", "")][r["metric"].get("placement", "")] = float(r["value"][1])
        # every expert rank of a gang counts the same switches
        rebalances = self._one(f"sum (max by (gang) (increase(ray_maverick_eplb_rebalances_total{{{a}}}[{w}])))")
        if not balancedness and rebalances is None:
            return []
        two = lambda v: "-" if v is None or math.isnan(v) else f"{v:.2f}"  # noqa: E731
        count = "-" if rebalances is None else f"{rebalances:.0f}"
        return [f"eplb: {count} rebalances in {w}; balancedness (served -> planned) by layer: " +
                (", ".join(f"L{layer} {two(b.get('served'))} -> {two(b.get('planned'))}"
                           for layer, b in sorted(balancedness.items(), key=lambda kv: int(kv[0]))) or "-")]


class EndpointSource:
    """The serving port's /metrics: the view of one ingress replica."""

    def __init__(self, url: str, api_key: str | None):
        self.url, self.api_key = url.rstrip("/") + "/metrics", api_key
        self.previous: dict | None = None
        self.previous_time = 0.0

    def _scrape(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        req = urllib.request.Request(self.url)
        if self.api_key:
            req.add_header("authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        samples = defaultdict(float)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] += s.value
        return samples

    def lines(self) -> list[str]:
        now, samples = time.monotonic(), self._scrape()
        prev, dt = self.previous or {}, max(1e-9, now - self.previous_time)
        self.previous, self.previous_time = samples, now

        def total(name: str, **match) -> float:
            return sum(v for (n, labels), v in samples.items()
                       if n == name and all(dict(labels).get(k) == x for k, x in match.items()))

        def delta(name: str) -> float:
            return total(name) - sum(v for (n, _), v in prev.items() if n == name)

        def quantile(metric: str, p: float) -> float | None:
            buckets = defaultdict(float)
            for (n, labels), v in samples.items():
                if n == f"{metric}_bucket":
                    le = float(dict(labels)["le"])
                    buckets[le] += v - sum(pv for (pn, pl), pv in prev.items()
                                           if pn == n and float(dict(pl)["le"]) == le)
            count = buckets.get(math.inf, 0)
            if not prev or count <= 0:
                return None
            return next(le for le in sorted(buckets) if buckets[le] >= p * count)

        out = [f"{'gang':<13} {'state':<11} {'attn':>4} {'restarts':>8} {'in flight':>9}"]
        gangs = sorted({dict(labels)["gang"] for (n, labels) in samples if n == "maverick_gang_state"})
        for g in gangs:
            state = next((dict(labels)["state"] for (n, labels), v in samples.items()
                          if n == "maverick_gang_state" and dict(labels)["gang"] == g and v == 1), "-")
            if state == "stopped":  # a gang that left (scaled down)
                continue
            out.append(f"{g:<13} {state:<11} {total('maverick_gang_attention_ranks', gang=g):>4.0f} "
                       f"{total('maverick_gang_restarts', gang=g):>8.0f} "
                       f"{total('maverick_gang_requests_in_flight', gang=g):>9.0f}")
        tok_s = delta("maverick_generation_tokens_total") / dt if prev else None
        out += ["", f"generation {_fmt(tok_s, ' tok/s')}   requests: " + ", ".join(
            f"{o} {total('maverick_requests_total', outcome=o):.0f}"
            for o in ("ok", "client_error", "rejected", "unavailable", "timeout", "server_error", "aborted")),
            f"TTFT p50 {_fmt(quantile('maverick_time_to_first_token_seconds', 0.5), ' ms', 1e3)}  "
            f"p99 {_fmt(quantile('maverick_time_to_first_token_seconds', 0.99), ' ms', 1e3)}   "
            f"TPOT p50 {_fmt(quantile('maverick_inter_token_latency_seconds', 0.5), ' ms', 1e3)}  "
            f"p99 {_fmt(quantile('maverick_inter_token_latency_seconds', 0.99), ' ms', 1e3)}",
            "(KV use and experts: give --prometheus)"]
        return out


def _why(exc: Exception, url: str, flag: str) -> str:
    """One line on what an operator got wrong (a key, a server that is not there), not a traceback."""
    if isinstance(exc, urllib.error.HTTPError) and exc.code == 401:
        return (f"{url} answered 401: the server requires an API key; pass --api-key KEY "
                "(or set MAVERICK_API_KEY)")
    if isinstance(exc, urllib.error.HTTPError):
        return f"{url} answered HTTP {exc.code} {exc.reason}: is {flag} the right server?"
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ConnectionRefusedError):
        return f"nothing answers at {url} (connection refused): is the server running there? (set {flag})"
    return f"cannot read {url}: {reason}"


def _checked_url(url: str, flag: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise SystemExit(f"maverick top: {flag} needs a URL with its scheme, e.g. http://{url.split('://')[-1]} "
                         f"(got {url!r})")
    return url


def run_top(args) -> int:
    if args.prometheus:
        source = PrometheusSource(_checked_url(args.prometheus, "--prometheus"), args.application, args.window)
        where, flag = f"Prometheus {args.prometheus}", "--prometheus"
    else:
        source = EndpointSource(_checked_url(args.url, "--url"), args.api_key or os.environ.get("MAVERICK_API_KEY"))
        where, flag = f"{args.url}/metrics", "--url"
    try:  # a first read, so a wrong URL, key or a server that is not running ends here in one line
        source.lines()
    except (OSError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        raise SystemExit(f"maverick top: {_why(exc, args.prometheus or source.url, flag)}") from None
    if not args.prometheus:  # rates need a second scrape
        time.sleep(min(args.interval, 2.0))
    live = sys.stdout.isatty() and not args.once
    while True:
        try:
            lines = source.lines()
        except OSError as exc:
            lines = [f"cannot read {where}: {exc}"]
        header = f"maverick top — {where} — {time.strftime('%H:%M:%S')}"
        text = "\n".join([header, ""] + lines)
        print(("\x1b[H\x1b[2J" if live else "") + text, flush=True)
        if args.once:
            return 0
        time.sleep(args.interval)


def add_top_parser(sub) -> None:
    p = sub.add_parser("top", help="a live terminal view of a running deployment")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the serving port (read its /metrics)")
    p.add_argument("--api-key", help="the deployment's API key (or MAVERICK_API_KEY)")
    p.add_argument("--prometheus", help="a Prometheus scraping the cluster (the full view)")
    p.add_argument("--application", default=".*", help="Serve application (regex) in the Prometheus view")
    p.add_argument("--window", default="1m", help="rate window of the Prometheus view")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one view and exit")
    p.set_defaults(func=run_top)
