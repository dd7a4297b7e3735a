"""The Markdown of a `bench serve` report (`cluster/bench/serve.py` assembles its rows)."""

from __future__ import annotations


def _f(row: dict, key: str, fmt: str = "{:.1f}") -> str:
    return fmt.format(row[key]) if key in row else "-"


def _rounds(row: dict, key: str) -> str:
    return ", ".join(f"{x:.0f}" for x in row.get(key, [])) or "-"


def markdown(out: dict) -> str:
    rows = out["results"]
    lines = [f"# Serving benchmark: streaming over HTTP (SSE) and gRPC, {out['prompt_len']} prompt + "
             f"{out['output_len']} output tokens, greedy, one gang of 1 attention + E expert workers", "",
             f"Each system alone: started and stopped around its part of each of {out['repeat']} rounds, the "
             "starting system rotating; medians. Reference: our offline engine (E=0) or the gang driven "
             "in-process (E>0). Share: serve tok/s over the same system's offline tok/s.", "",
             "| E | concurrency | ours offline tok/s | HTTP tok/s | gRPC tok/s | vLLM offline tok/s | vLLM serve tok/s "
             "| HTTP / vLLM serve | gRPC / vLLM serve | ours share (HTTP) | vLLM share | HTTP TPOT ms | gRPC TPOT ms "
             "| vLLM TPOT ms | HTTP TTFT ms | vLLM TTFT ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["reference"]
        lines.append(
            f"| {r['expert_workers']} | {r['concurrency']} | {_f(r, ref + '_tok_s')} | {_f(r, 'http_tok_s')} | "
            f"{_f(r, 'grpc_tok_s')} | {_f(r, 'vllm_engine_tok_s')} | {_f(r, 'vllm_tok_s')} | "
            f"{_f(r, 'http_vs_vllm_tok_s', '{:.2f}x')} | {_f(r, 'grpc_vs_vllm_tok_s', '{:.2f}x')} | "
            f"{_f(r, 'http_share', '{:.0%}')} | {_f(r, 'vllm_share', '{:.0%}')} | {_f(r, 'http_tpot_ms')} | "
            f"{_f(r, 'grpc_tpot_ms')} | {_f(r, 'vllm_tpot_ms')} | {_f(r, 'http_ttft_ms', '{:.0f}')} | "
            f"{_f(r, 'vllm_ttft_ms', '{:.0f}')} |")
    lines += ["", "Every round's tok/s:", "", "| E | concurrency | system | rounds |", "|---|---|---|---|"]
    for r in rows:
        for key in sorted(k for k in r if k.endswith("_rounds_tok_s")):
            lines.append(f"| {r['expert_workers']} | {r['concurrency']} | {key.removesuffix('_rounds_tok_s')} | "
                         f"{_rounds(r, key)} |")
    for ratio, twin, on, off in (("metrics_on_vs_off_tok_s", "http_nometrics", "metrics on", "metrics off"),
                                 ("resume_on_vs_off_tok_s", "http_noresume", "resumable", "migration_limit 0")):
        if ratio not in rows[0]:
            continue
        lines += ["", f"| E | concurrency | HTTP tok/s, {on} | HTTP tok/s, {off} | on / off | TPOT ms on | "
                  "TPOT ms off |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['expert_workers']} | {r['concurrency']} | {_f(r, 'http_tok_s')} | "
                         f"{_f(r, twin + '_tok_s')} | {_f(r, ratio, '{:.3f}x')} | "
                         f"{_f(r, 'http_tpot_ms')} | {_f(r, twin + '_tpot_ms')} |")
    if "http_schema_tpot_ms" in rows[0]:
        lines += ["", "Under a JSON schema (`--structured json-schema`; TPOT ms, medians over rounds):", "",
                  "| E | concurrency | HTTP | HTTP, schema | schema / free | vLLM | vLLM, schema | schema / free | "
                  "ours / vLLM under the schema |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['expert_workers']} | {r['concurrency']} | {_f(r, 'http_tpot_ms')} | "
                         f"{_f(r, 'http_schema_tpot_ms')} | {_f(r, 'http_schema_over_http_tpot', '{:.2f}x')} | "
                         f"{_f(r, 'vllm_tpot_ms')} | {_f(r, 'vllm_schema_tpot_ms')} | "
                         f"{_f(r, 'vllm_schema_over_vllm_tpot', '{:.2f}x')} | "
                         f"{_f(r, 'http_schema_vs_vllm_schema_tpot', '{:.2f}x')} |")
    if out.get("idle_cores"):
        lines += ["", f"Idle servers, cores by process over {out['idle_seconds']:.0f} s (round 1, after warm-up):", ""]
        for system, cores in out["idle_cores"].items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in cores.items())
            lines.append(f"- {system}: **{sum(cores.values()):.3f}** ({shown})")
    cpu = [(r, k) for r in rows for k in sorted(r) if k.endswith("_cpu_cores")]
    if cpu:
        lines += ["", "Where the CPU goes at the highest concurrency (median round's cores by process, the client "
                  "included):", ""]
        for r, key in cpu:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in r[key].items() if v >= 0.005)
            lines.append(f"- E={r['expert_workers']} {key.removesuffix('_cpu_cores')} at {r['concurrency']}: {shown}")
    return "\n".join(lines) + "\n"
