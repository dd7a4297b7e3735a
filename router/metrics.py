"""Request, token, latency and gang metrics of an ingress replica, with vLLM's meanings.

Each metric is recorded twice, by one call: through `ray.serve.metrics` (Ray's metrics agent exports
it as `ray_maverick_...`, with the `application`, `deployment` and `replica` tags, found through
Ray's service-discovery file) and into this replica's own `prometheus_client` registry, which
`GET /metrics` on the serving port renders as `maverick_...` (where `aiperf`, KServe and request-rate
autoscalers look, as they do on `vllm serve`).

Every HTTP or gRPC generation request is counted once as received and once by its outcome, so
`received == sum(outcomes)` (a `Ticket` closes exactly once).
"""

from __future__ import annotations

import time

import prometheus_client as prom

from router.errors import status_of

# vLLM's buckets (RAY.md §6.5), which span a GPU's milliseconds and a 2-core CPU's seconds
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80,
                160, 640, 2560]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680]
PHASE_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560]
LENGTH_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]

OUTCOMES = ("ok", "client_error", "rejected", "unavailable", "timeout", "server_error", "aborted")
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "Generate", "GenerateStream")


def outcome_of(exc: BaseException | None) -> str:
    """The error table's status, as an outcome label."""
    if exc is None:
        return "ok"
    status, _ = status_of(exc)
    return {429: "rejected", 503: "unavailable", 504: "timeout"}.get(
        status, "client_error" if status < 500 else "server_error")


class _Metric:
    """One metric in both exporters."""

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...], registry, buckets=None):
        from ray.serve import metrics as serve_metrics

        self.kind, self.labels = kind, labels
        if kind == "counter":
            self.ray = serve_metrics.Counter(name, doc, tag_keys=labels)
            self.prom = prom.Counter(name, doc, labels, registry=registry)
        elif kind == "gauge":
            self.ray = serve_metrics.Gauge(name, doc, tag_keys=labels)
            self.prom = prom.Gauge(name, doc, labels, registry=registry)
        else:
            self.ray = serve_metrics.Histogram(name, doc, boundaries=buckets, tag_keys=labels)
            self.prom = prom.Histogram(name, doc, labels, buckets=buckets, registry=registry)

    def record(self, value: float, tags: dict[str, str]) -> None:
        child = self.prom.labels(**tags) if self.labels else self.prom
        if self.kind == "counter":
            if value > 0:  # ray's Counter.inc rejects 0
                self.ray.inc(value, tags=tags)
                child.inc(value)
        elif self.kind == "gauge":
            self.ray.set(value, tags=tags)
            child.set(value)
        else:
            self.ray.observe(value, tags=tags)
            child.observe(value)


class RequestMetrics:
    def __init__(self, model_name: str, enabled: bool = True):
        self.enabled = enabled
        self.model = {"model_name": model_name}
        self.registry = prom.CollectorRegistry(auto_describe=True)
        if not enabled:
            return
        m, r = ("model_name",), self.registry
        self.received = _Metric("counter", "maverick_requests_received", "HTTP and gRPC generation requests received",
                                m + ("route", "protocol"), r)
        self.finished = _Metric("counter", "maverick_requests", "HTTP and gRPC generation requests by outcome "
                                "(ok, client_error, rejected 429, unavailable 503, timeout 504, server_error, "
                                "aborted by the client)", m + ("route", "protocol", "outcome"), r)
        self.success = _Metric("counter", "maverick_request_success", "Finished choices by finish reason "
                               "(vllm:request_success)", m + ("finished_reason",), r)
        self.prompt_tokens = _Metric("counter", "maverick_prompt_tokens", "Prompt tokens of engine requests the "
                                     "engine took (vllm:prompt_tokens)", m, r)
        self.generation_tokens = _Metric("counter", "maverick_generation_tokens", "Generated tokens "
                                         "(vllm:generation_tokens)", m, r)
        self.in_flight = _Metric("gauge", "maverick_requests_in_flight", "Requests admitted by this ingress "
                                 "replica and not yet finished", m, r)
        self.ttft = _Metric("histogram", "maverick_time_to_first_token_seconds", "Arrival to first token "
                            "(vllm:time_to_first_token_seconds)", m, r, TTFT_BUCKETS)
        self.itl = _Metric("histogram", "maverick_inter_token_latency_seconds", "Time between output tokens "
                           "(vllm:inter_token_latency_seconds)", m, r, ITL_BUCKETS)
        self.e2e = _Metric("histogram", "maverick_e2e_request_latency_seconds", "Arrival to the last token "
                           "(vllm:e2e_request_latency_seconds)", m, r, E2E_BUCKETS)
        self.phases = {name: _Metric("histogram", f"maverick_request_{name}_time_seconds", doc, m, r, PHASE_BUCKETS)
                       for name, doc in (("queue", "Waiting in the engine before first scheduled "
                                                   "(vllm:request_queue_time_seconds)"),
                                         ("prefill", "First scheduled to first token "
                                                     "(vllm:request_prefill_time_seconds)"),
                                         ("decode", "First token to finished (vllm:request_decode_time_seconds)"))}
        self.prompt_len = _Metric("histogram", "maverick_request_prompt_tokens", "Prompt length per engine request "
                                  "(vllm:request_prompt_tokens)", m, r, LENGTH_BUCKETS)
        self.generation_len = _Metric("histogram", "maverick_request_generation_tokens", "Generated tokens per "
                                      "choice (vllm:request_generation_tokens)", m, r, LENGTH_BUCKETS)
        self.gang_ready = _Metric("gauge", "maverick_gang_ready", "1 while the gang takes requests", m + ("gang",), r)
        self.gang_state = _Metric("gauge", "maverick_gang_state", "1 for the gang's current state (starting, draining, "
                                  "ready, failed, rebuilding, stopped, unreachable)", m + ("gang", "state"), r)
        self.gang_restarts = _Metric("gauge", "maverick_gang_restarts", "Rebuilds of the gang since it started",
                                     m + ("gang",), r)
        self.gang_hangs = _Metric("gauge", "maverick_gang_hangs_found", "Hangs declared in the gang since it started, "
                                  "by what found them (watchdog: the step watchdog; health_check: the periodic check)",
                                  m + ("gang", "found_by"), r)
        self.gang_attention_ranks = _Metric("gauge", "maverick_gang_attention_ranks", "Attention ranks the gang runs "
                                            "now (attention scaling changes them while it serves)", m + ("gang",), r)
        self.gang_in_flight = _Metric("gauge", "maverick_gang_requests_in_flight", "Engine requests this "
                                      "ingress has on the gang", m + ("gang",), r)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)

    # -- per request -----------------------------------------------------------------------------------

    def ticket(self, route: str, protocol: str, on_release=None) -> "Ticket":
        return Ticket(self, route, protocol, on_release)

    def engine_request(self, prompt_tokens: int) -> "EngineRequestClock":
        return EngineRequestClock(self, prompt_tokens)

    def set_in_flight(self, n: int) -> None:
        if self.enabled:
            self.in_flight.record(n, self.model)

    def gangs(self, gangs: dict, left: list[str], leaving: dict[str, int] | None = None) -> None:
        """`gangs`: a `GangPool`'s gangs by id; `left`: those gone since the last call (said once);
        `leaving`: gone from Serve's running set, still draining this ingress's streams (their load)."""
        if not self.enabled:
            return
        for name in left:
            self._gang(name, {"state": "stopped", "ready": False, "draining": False}, 0)
        for name, load in (leaving or {}).items():
            self._gang(name, {"state": "draining", "ready": False, "draining": True}, load)
        for name, g in gangs.items():
            self._gang(name, g.status, g.load)

    def _gang(self, name: str, status: dict | None, in_flight: int) -> None:
        tags = {**self.model, "gang": name}
        state = ("draining" if status.get("draining") else status["state"]) if status else "unreachable"
        self.gang_ready.record(float(bool(status and status["ready"] and not status.get("draining"))), tags)
        for s in GANG_STATES:
            self.gang_state.record(float(s == state), {**tags, "state": s})
        if status and "restarts" in status:
            self.gang_restarts.record(status["restarts"], tags)
        for found_by, count in ((status or {}).get("hangs_found") or {}).items():
            self.gang_hangs.record(count, {**tags, "found_by": found_by})
        if status and "attention_ranks" in status:
            self.gang_attention_ranks.record(status["attention_ranks"], tags)
        self.gang_in_flight.record(in_flight, tags)


GANG_STATES = ("starting", "ready", "draining", "failed", "rebuilding", "stopped", "unreachable")


class Ticket:
    """One generation request's passage through the ingress: counted received now, and at `close` (once,
    whatever the path) counted by outcome and, if it was admitted, released (`on_release`)."""

    def __init__(self, metrics: RequestMetrics, route: str, protocol: str, on_release=None):
        self.metrics, self.closed, self.admitted = metrics, False, False
        self.on_release = on_release
        self.tags = {**metrics.model, "route": route, "protocol": protocol}
        if metrics.enabled:
            metrics.received.record(1, self.tags)

    def close(self, outcome: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.admitted and self.on_release is not None:
            self.on_release()
        if self.metrics.enabled:
            self.metrics.finished.record(1, {**self.tags, "outcome": outcome})


class EngineRequestClock:
    """Latencies of one engine request (one prompt, all its choices), fed with its outputs as they come."""

    def __init__(self, metrics: RequestMetrics, prompt_tokens: int):
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: dict[int, float] = {}  # choice -> when its latest token arrived
        self.prompt_tokens: int | None = prompt_tokens  # counted at the engine's first output, then None

    def outputs(self, batch) -> None:
        m = self.metrics
        if not m.enabled:
            return
        now, tags = time.monotonic(), m.model
        if self.prompt_tokens is not None and any(out.error is None for out in batch):
            # the engine took the prompt (vLLM counts only those): one it refused with 400 never gets here
            m.prompt_tokens.record(self.prompt_tokens, tags)
            m.prompt_len.record(self.prompt_tokens, tags)
            self.prompt_tokens = None
        for out in batch:
            n = len(out.new_token_ids)
            if n:
                before = self.last.get(out.index)
                if before is None:  # a choice's first token: TTFT once per engine request, as vLLM counts
                    if not self.last:
                        m.ttft.record(now - self.start, tags)
                    n -= 1
                for _ in range(n):  # tokens that came together share the gap
                    m.itl.record((now - (before or now)) / max(1, n), tags)
                self.last[out.index] = now
                m.generation_tokens.record(len(out.new_token_ids), tags)
            if out.finished:
                m.e2e.record(now - self.start, tags)
                m.success.record(1, {**tags, "finished_reason": out.finish_reason})
                if out.usage is not None:
                    m.generation_len.record(out.usage.completion_tokens, tags)
                if out.timings is not None:
                    for name in ("queue", "prefill", "decode"):
                        m.phases[name].record(getattr(out.timings, f"{name}_s"), tags)
