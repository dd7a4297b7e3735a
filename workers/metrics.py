"""Engine, gang and expert metrics of one rank, exported through Ray's per-node metrics agent.

The wave thread never touches a metric: it leaves a frozen snapshot after every step (the engine's
`EngineStats`, an expert rank's counters), and a daemon thread here turns the snapshot into metric
updates once per `period_s`: gauges set, counters increased by what changed since the last look.
Exported names gain Ray's `ray_` prefix (`maverick_num_requests_running` is scraped as
`ray_maverick_num_requests_running`); the README maps each to vLLM's name.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

# decode steps take ~5 ms on a GPU and up to seconds for a big CPU prefill
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24]
TAGS = ("application", "gang", "rank", "role")


class RankMetrics:
    """The metrics one rank exports; `update` is called by the exporter thread only."""

    def __init__(self, labels: dict[str, str], expert_layer_matrix: bool = False):
        from ray.util import metrics as m

        self.labels = labels
        self.expert_layer_matrix = expert_layer_matrix
        g = lambda name, doc, keys=(): m.Gauge(name, doc, tag_keys=TAGS + keys)  # noqa: E731
        c = lambda name, doc, keys=(): m.Counter(name, doc, tag_keys=TAGS + keys)  # noqa: E731
        self.running = g("maverick_num_requests_running", "Requests in the running batch (vllm:num_requests_running)")
        self.waiting = g("maverick_num_requests_waiting", "Requests waiting to be scheduled (vllm:num_requests_waiting)")
        self.kv_usage = g("maverick_kv_cache_usage_perc", "Fraction of KV blocks in use, per layer group (0-1)",
                          ("group",))
        self.counters = {
            "preemptions": c("maverick_num_preemptions", "Running requests preempted (recomputed later)"),
            "blocked_steps": c("maverick_blocked_steps", "Steps that could schedule none of the waiting requests"),
            "prefix_queries": c("maverick_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
            "prefix_hits": c("maverick_prefix_cache_hits", "Prompt tokens found in the prefix cache"),
            "chunked_released": c("maverick_kv_chunked_blocks_released",
                                  "Chunked-attention KV blocks released early, behind the chunk window"),
            "engine_steps": c("maverick_engine_steps", "Engine steps that computed tokens"),
            "step_tokens": c("maverick_engine_step_tokens", "Tokens computed by engine steps (prefill + decode)"),
            "microbatched_steps": c("maverick_microbatched_steps", "Engine steps run as two ping-pong micro-batches "
                                    "(engine.microbatches: 2)"),
            "alltoall_seconds": c("maverick_alltoall_seconds", "Seconds this rank spent in all-to-all collectives"),
            "alltoall_bytes": c("maverick_alltoall_bytes", "Bytes this rank sent by all-to-all (dispatch on "
                                "attention ranks, combine on expert ranks)"),
            "idle_seconds": c("maverick_rank_idle_seconds", "Seconds this rank's wave loop slept (idle gang)"),
        }
        self.step_seconds = m.Histogram("maverick_step_seconds", "Duration of engine steps that computed tokens",
                                        boundaries=STEP_BUCKETS, tag_keys=TAGS)
        self.expert_tokens = c("maverick_expert_tokens", "Tokens routed to each expert, all MoE layers",
                               ("expert",))
        self.layer_tokens = c("maverick_expert_rank_layer_tokens", "Tokens this expert rank served per MoE layer",
                              ("layer",))
        self.layer_expert_tokens = (c("maverick_expert_layer_tokens", "Tokens routed per (MoE layer, expert)",
                                      ("layer", "expert")) if expert_layer_matrix else None)
        self.rebalances = c("maverick_eplb_rebalances", "Expert rebalances this expert rank switched to (eplb)")
        self.rebalance_seconds = c("maverick_eplb_rebalance_seconds", "Seconds from each rebalance's decision to "
                                   "its switch step (staging overlapped the steps in between)")
        self.rebalance_bytes = c("maverick_eplb_rebalance_bytes", "Expert weight bytes this rank read for rebalances")
        self.balancedness = g("maverick_eplb_balancedness", "Mean over max tokens per expert rank, per MoE layer, "
                              "in the last rebalance window: as served, and as the new placement would serve it",
                              ("layer", "placement"))
        self._last: dict[tuple, float] = {}

    def _inc(self, metric, key: tuple, total: float, tags: dict[str, str] | None = None) -> None:
        delta = total - self._last.get(key, 0)
        if delta > 0:  # ray's Counter.inc rejects 0
            metric.inc(delta, tags={**self.labels, **(tags or {})})
            self._last[key] = total

    def engine(self, s, step_seconds: list[float]) -> None:
        """From an attention rank's `EngineStats` snapshot and the step durations since the last call."""
        self.running.set(s.num_running, tags=self.labels)
        self.waiting.set(s.num_waiting, tags=self.labels)
        for group, total in s.kv.blocks_total.items():
            self.kv_usage.set(s.kv.blocks_used[group] / max(1, total), tags={**self.labels, "group": group})
        values = {"preemptions": s.num_preemptions_total, "blocked_steps": s.num_blocked_steps_total,
                  "prefix_queries": s.kv.prefix_queries_tokens, "prefix_hits": s.kv.prefix_hits_tokens,
                  "chunked_released": s.kv.chunked_blocks_released_total, "engine_steps": s.num_steps,
                  "step_tokens": s.scheduled_tokens_total, "microbatched_steps": s.microbatched_steps_total}
        for name, total in values.items():
            self._inc(self.counters[name], (name,), total)
        for seconds in step_seconds:
            self.step_seconds.observe(seconds, tags=self.labels)

    def comm(self, alltoall_seconds: float, alltoall_bytes: int, idle_seconds: float) -> None:
        self._inc(self.counters["alltoall_seconds"], ("alltoall_seconds",), alltoall_seconds)
        self._inc(self.counters["alltoall_bytes"], ("alltoall_bytes",), alltoall_bytes)
        self._inc(self.counters["idle_seconds"], ("idle_seconds",), idle_seconds)

    def experts(self, moe_layers: list[int], load_LE) -> None:
        """An expert rank's rows per (MoE layer, expert) since start, as a nested list."""
        per_expert = [sum(col) for col in zip(*load_LE)]
        for expert, total in enumerate(per_expert):
            if total:
                self._inc(self.expert_tokens, ("expert", expert), total, {"expert": str(expert)})
        for layer, row in zip(moe_layers, load_LE):
            self._inc(self.layer_tokens, ("layer", layer), sum(row), {"layer": str(layer)})
            if self.layer_expert_tokens is not None:
                for expert, total in enumerate(row):
                    if total:
                        self._inc(self.layer_expert_tokens, ("cell", layer, expert), total,
                                  {"layer": str(layer), "expert": str(expert)})


    def eplb(self, stats: dict) -> None:
        """From an expert rank's `RebalanceStats` (as a dict)."""
        self._inc(self.rebalances, ("rebalances",), stats["rebalances"])
        self._inc(self.rebalance_seconds, ("rebalance_seconds",), stats["seconds_total"])
        self._inc(self.rebalance_bytes, ("rebalance_bytes",), stats["bytes_total"])
        for placement in ("served", "planned"):
            by_layer = stats["balancedness" if placement == "served" else "planned"]
            for layer, value in by_layer.items():
                self.balancedness.set(value, tags={**self.labels, "layer": str(layer), "placement": placement})


class Exporter:
    """A daemon thread calling `publish()` every `period_s` until stopped (errors logged, never raised)."""

    def __init__(self, publish: Callable[[], None], period_s: float, name: str):
        self.publish, self.period_s = publish, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metrics-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.publish()
            except Exception:  # a metrics bug must never take a rank down
                log.exception("metrics export failed")
