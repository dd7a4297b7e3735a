"""The Grafana dashboards in `deploy/grafana/dashboards/`, written from the panel lists below.

The JSON is built with Grafana Labs' foundation SDK (`grafana-foundation-sdk`): typed builders generated
from Grafana's own dashboard schema, so a field or value the schema lacks cannot be written (the panel
lists here are data; no dict reaches the JSON unchecked but a variable's Prometheus query object).
`maverick dashboards` writes them; `maverick dashboards --check` (and a test) fails when the committed
JSON differs from what this module writes. Every query uses the `$datasource`, `$application` and
`$model` variables (and `$gang` where per gang), and the test runs each against a live Prometheus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as sdk
from grafana_foundation_sdk.builders import heatmap, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableHide, VariableOption, VariableRefresh

OUT_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"
APP = 'application=~"$application"'
SEL = f'{{{APP},model_name=~"$model"}}'  # ingress metrics
RANK = f'{{{APP},gang=~"$gang"}}'  # rank metrics
RATE = "[$__rate_interval]"


def q_rate(metric: str, sel: str = SEL, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}{sel}{RATE}))"


def q_quantile(q: float, metric: str, sel: str = SEL, by: str = "") -> str:
    extra = f", {by}" if by else ""
    return f"histogram_quantile({q}, sum by (le{extra}) (rate({metric}_bucket{sel}{RATE})))"


@dataclass
class Panel:
    title: str
    description: str
    unit: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    kind: str = "timeseries"  # or "heatmap"


def _latency(title: str, metric: str, what: str) -> Panel:
    return Panel(title, f"p50 and p99 of {what}.", "s",
                 [(q_quantile(0.5, metric), "p50"), (q_quantile(0.99, metric), "p99")])


SERVING = [
    Panel("Requests by outcome", "Finished HTTP and gRPC generation requests per second: ok, client_error "
          "(4xx), rejected (429), unavailable (503), timeout (504), server_error (5xx), aborted by the client.",
          "reqps", [(q_rate("ray_maverick_requests_total", by="outcome"), "{{outcome}}")]),
    Panel("Requests received by route", "Generation requests arriving per second, by route and protocol.",
          "reqps", [(q_rate("ray_maverick_requests_received_total", by="route, protocol"),
                     "{{protocol}} {{route}}")]),
    _latency("Time to first token", "ray_maverick_time_to_first_token_seconds", "arrival to first token"),
    _latency("Inter-token latency", "ray_maverick_inter_token_latency_seconds", "the gap between output tokens"),
    _latency("End-to-end latency", "ray_maverick_e2e_request_latency_seconds", "arrival to the last token"),
    Panel("Token throughput", "Prompt and generated tokens per second.", "short",
          [(q_rate("ray_maverick_prompt_tokens_total"), "prompt"),
           (q_rate("ray_maverick_generation_tokens_total"), "generation")]),
    Panel("Running and waiting requests", "Requests in the engines' running batches and waiting queues.", "short",
          [(f"sum (ray_maverick_num_requests_running{RANK})", "running"),
           (f"sum (ray_maverick_num_requests_waiting{RANK})", "waiting")]),
    Panel("Finished choices by reason", "stop, length, abort or error, per second.", "reqps",
          [(q_rate("ray_maverick_request_success_total", by="finished_reason"), "{{finished_reason}}")]),
    Panel("Queue, prefill and decode time (p50)", "Where an engine request's time goes.", "s",
          [(q_quantile(0.5, f"ray_maverick_request_{p}_time_seconds"), p) for p in ("queue", "prefill", "decode")]),
    Panel("In flight per ingress replica", "Admitted requests not yet finished (beyond max_pending_requests: 429).",
          "short", [(f"sum by (replica) (ray_maverick_requests_in_flight{SEL})", "{{replica}}")]),
]

_LAYER_RANK = f"sum by (layer, rank) (rate(ray_maverick_expert_rank_layer_tokens_total{RANK}{RATE}))"
GANGS = [
    Panel("Gangs", "Gangs taking requests, and the count Serve's autoscaler wants (autoscaling; without it, "
          "the ready count).", "short",
          [(f"count (max by (gang) (ray_maverick_gang_ready{{{APP}}}) == 1) or vector(0)", "ready"),
           (f'max (ray_serve_autoscaling_desired_replicas{{{APP},deployment="gangs"}}) or '
            f"count (max by (gang) (ray_maverick_gang_ready{{{APP}}}) == 1) or vector(0)", "wanted")]),
    Panel("Gang scaling events", "Changes of the gang count Serve's autoscaler applied in the last hour, by "
          "direction and reason (load, or bounds a redeploy moved); each is logged with its figures.", "short",
          [(f"sum by (direction, reason) (increase(ray_maverick_gang_scaling_events_total{{{APP}}}[1h])) "
            "or vector(0)", "{{direction}} ({{reason}})")]),
    Panel("Attention ranks", "Attention ranks each running gang has now (attention_scaling adds and removes them "
          "while it serves).", "short",
          [(f"max by (gang) (ray_maverick_gang_attention_ranks{{{APP}}}) unless on (gang) "
            f'(max by (gang) (ray_maverick_gang_state{{{APP},state="stopped"}}) == 1)', "{{gang}}")]),
    Panel("Attention scaling events", "Attention ranks added to and removed from running gangs in the last hour, "
          "by direction and reason (kv, queue: up; idle: down); each is logged with its figures.", "short",
          [(f"sum by (gang, direction, reason) (increase(ray_maverick_attention_scaling_events_total{{{APP}}}[1h])) "
            "or vector(0)", "{{gang}} {{direction}} ({{reason}})")]),
    Panel("Gang state", "1 for each gang's current state (starting, ready, draining, failed, rebuilding, "
          "unreachable); gangs that left are not shown.", "short",
          [(f'max by (gang, state) (ray_maverick_gang_state{{{APP},state!="stopped"}}) > 0', "{{gang}} {{state}}")]),
    Panel("Gang restarts", "Rebuilds of each gang since it started (gangs running now), and the hangs among "
          "their causes by what found them: the step watchdog, or the periodic health check (an idle gang).", "short",
          [(f"max by (gang) (ray_maverick_gang_restarts{{{APP}}}) unless on (gang) "
            f'(max by (gang) (ray_maverick_gang_state{{{APP},state="stopped"}}) == 1)', "{{gang}}"),
           (f"max by (gang, found_by) (ray_maverick_gang_hangs_found{{{APP}}}) unless on (gang) "
            f'(max by (gang) (ray_maverick_gang_state{{{APP},state="stopped"}}) == 1)',
            "{{gang}} hangs found by {{found_by}}")]),
    Panel("Step time", "p50 and p99 of engine steps that computed tokens, per gang.", "s",
          [(q_quantile(0.5, "ray_maverick_step_seconds", RANK, "gang"), "{{gang}} p50"),
           (q_quantile(0.99, "ray_maverick_step_seconds", RANK, "gang"), "{{gang}} p99")]),
    Panel("Time in all-to-all", "Share of each rank's time spent in the MoE collectives.", "percentunit",
          [(f"sum by (gang, rank) (rate(ray_maverick_alltoall_seconds_total{RANK}{RATE}))", "{{gang}} rank {{rank}}")]),
    Panel("All-to-all traffic", "Bytes per second sent by dispatch (attention ranks) and combine (expert ranks).",
          "Bps", [(f"sum by (gang, role) (rate(ray_maverick_alltoall_bytes_total{RANK}{RATE}))", "{{gang}} {{role}}")]),
    Panel("Idle fraction", "Share of time each gang's ranks sleep between waves.", "percentunit",
          [(f"avg by (gang) (rate(ray_maverick_rank_idle_seconds_total{RANK}{RATE}))", "{{gang}}")]),
    Panel("Tokens per step", "Tokens computed per engine step (prefill chunks + decodes).", "short",
          [(f"sum by (gang) (rate(ray_maverick_engine_step_tokens_total{RANK}{RATE})) / "
            f"sum by (gang) (rate(ray_maverick_engine_steps_total{RANK}{RATE}))", "{{gang}}")]),
    Panel("Micro-batched steps", "Share of engine steps run as two ping-pong micro-batches (engine.microbatches: "
          "2; 0 when off or when every step is too small to split).", "percentunit",
          [(f"(sum by (gang) (rate(ray_maverick_microbatched_steps_total{RANK}{RATE})) or "
            f"0 * sum by (gang) (rate(ray_maverick_engine_steps_total{RANK}{RATE}))) / "
            f"sum by (gang) (rate(ray_maverick_engine_steps_total{RANK}{RATE}))", "{{gang}}")]),
    Panel("Expert load per layer and rank", "Tokens per second each expert rank serves, per MoE layer.", "short",
          [(_LAYER_RANK, "layer {{layer}} rank {{rank}}")], kind="heatmap"),
    Panel("Rank imbalance per layer", "max / mean over expert ranks of the tokens served per MoE layer "
          "(1 is perfectly balanced).", "short",
          [(f"max by (layer) ({_LAYER_RANK}) / avg by (layer) ({_LAYER_RANK})", "layer {{layer}}")]),
    Panel("Expert balancedness per layer", "Mean / max over expert ranks of the tokens served per MoE layer "
          "(vLLM's definition: 1 is balanced); with eplb, also the last rebalance window as it was served and "
          "as the new placement plans it.", "percentunit",
          [(f"avg by (layer) ({_LAYER_RANK}) / max by (layer) ({_LAYER_RANK})", "layer {{layer}} measured"),
           (f"min by (layer, placement) (ray_maverick_eplb_balancedness{RANK})", "layer {{layer}} {{placement}}")]),
    Panel("Expert rebalances", "Placements each gang switched to per second (eplb).", "short",
          [(f"max by (gang) (rate(ray_maverick_eplb_rebalances_total{RANK}{RATE}))", "{{gang}}")]),
    Panel("Rebalance loads", "Expert weight bytes the expert ranks read per second to stage rebalances (eplb).",
          "Bps", [(f"sum by (gang) (rate(ray_maverick_eplb_rebalance_bytes_total{RANK}{RATE}))", "{{gang}}")]),
    Panel("Hottest experts", "The ten experts receiving the most tokens per second (all MoE layers).", "short",
          [(f"topk(10, sum by (expert) (rate(ray_maverick_expert_tokens_total{RANK}{RATE})))", "expert {{expert}}")]),
]

KV = [
    Panel("KV cache usage", "Fraction of KV blocks in use per attention rank and layer group.", "percentunit",
          [(f"max by (gang, rank, group) (ray_maverick_kv_cache_usage_perc{RANK})", "{{gang}} {{rank}} {{group}}")]),
    Panel("Prefix cache hit rate", "Prompt tokens found in the prefix cache over prompt tokens looked up.",
          "percentunit", [(f"sum (rate(ray_maverick_prefix_cache_hits_total{RANK}{RATE})) / "
                           f"sum (rate(ray_maverick_prefix_cache_queries_total{RANK}{RATE}))", "hit rate")]),
    Panel("Prefix cache tokens", "Prompt tokens looked up and found, per second.", "short",
          [(f"sum (rate(ray_maverick_prefix_cache_queries_total{RANK}{RATE}))", "queries"),
           (f"sum (rate(ray_maverick_prefix_cache_hits_total{RANK}{RATE}))", "hits")]),
    Panel("Chunked KV blocks released early", "Blocks of chunked-attention layers freed behind the chunk window "
          "per second.", "short",
          [(f"sum by (gang) (rate(ray_maverick_kv_chunked_blocks_released_total{RANK}{RATE}))", "{{gang}}")]),
    Panel("Preemptions and blocked steps", "Running requests preempted for KV blocks, and steps that could run "
          "none of the waiting requests, per second (0 when absent).", "short",
          [(f"sum (rate(ray_maverick_num_preemptions_total{RANK}{RATE})) or vector(0)", "preemptions"),
           (f"sum (rate(ray_maverick_blocked_steps_total{RANK}{RATE})) or vector(0)", "blocked steps")]),
    Panel("Waiting requests per gang", "Requests queued for KV blocks or batch room.", "short",
          [(f"sum by (gang) (ray_maverick_num_requests_waiting{RANK})", "{{gang}}")]),
]

DASHBOARDS = {"maverick-serving": ("maverick: serving", SERVING), "maverick-gangs": ("maverick: gangs and experts", GANGS),
              "maverick-kv": ("maverick: KV and prefix cache", KV)}


DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
PANELS = {"timeseries": timeseries.Panel, "heatmap": heatmap.Panel}


def _variables() -> list:
    def query(name: str, label: str, metric: str) -> sdk.QueryVariable:
        return (sdk.QueryVariable(name).label(label).datasource(DATASOURCE)
                .query({"query": f"label_values({metric}, {label})", "refId": f"{name}-var"})
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(True).multi(True).all_value(".*")
                .current(VariableOption(selected=True, text="All", value="$__all")))

    return [sdk.DatasourceVariable("datasource").label("Data source").type("prometheus").hide(VariableHide.DONT_HIDE),
            query("application", "application", "ray_maverick_requests_received_total"),
            query("model", "model_name", "ray_maverick_requests_received_total"),
            query("gang", "gang", "ray_maverick_engine_steps_total")]


def _panel(i: int, p: Panel):
    panel = (PANELS[p.kind]().id(i + 1).title(p.title).description(p.description).datasource(DATASOURCE)
             .unit(p.unit).height(8).span(12))  # two to a row; the dashboard builder places them
    for j, (expr, legend) in enumerate(p.targets):
        panel.with_target(prometheus.Dataquery().ref_id(chr(ord("A") + j)).expr(expr).legend_format(legend)
                          .datasource(DATASOURCE))
    return panel


def dashboard(uid: str) -> dict:
    title, panels = DASHBOARDS[uid]
    board = (sdk.Dashboard(title).uid(uid).tags(["maverick"]).timezone("browser").version(1).refresh("10s")
             .time("now-30m", "now").editable().variables(_variables()))
    for i, p in enumerate(panels):
        board.with_panel(_panel(i, p))
    return json.loads(JSONEncoder().encode(board.build()))


def render(uid: str) -> str:
    return json.dumps(dashboard(uid), indent=2) + "\n"


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid in DASHBOARDS:
        path = out_dir / f"{uid}.json"
        path.write_text(render(uid))
        paths.append(path)
    return paths


def stale(out_dir: Path = OUT_DIR) -> list[str]:
    """Dashboards whose committed JSON differs from what this module writes."""
    return [uid for uid in DASHBOARDS
            if not (out_dir / f"{uid}.json").is_file() or (out_dir / f"{uid}.json").read_text() != render(uid)]


def queries(uid: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard."""
    return [(p.title, expr) for p in DASHBOARDS[uid][1] for expr, _ in p.targets]
