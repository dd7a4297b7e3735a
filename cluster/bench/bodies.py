"""`maverick bench bodies`: what large request bodies cost the streams already running.

`maverick serve` (E=0, with its tokenizer: large text must be tokenized) and, with `--peers vllm`,
`vllm serve`, each started alone for its part of every round (`../shared/PEERS.md`). Each round runs `--concurrency` greedy streams twice, in alternating order: once alone (`quiet`), once
while `--big-requests` requests with `--body-mb` MB bodies arrive, spread over the streaming phase
(`loaded`). Half are chat completions (a JSON parse, the chat template, tokenization), half text
completions (a parse and tokenization); their prompts are longer than the context, so each ends in a
400 once the ingress has done that work, which is what a hostile or careless client sends. The big
bodies go out from threads, pre-encoded, so the measuring client's loop only reads its streams.
Another thread reads `/health` every 200 ms (faster costs the stack the CPU it measures): its latency
is the server loop's responsiveness, apart from what the streams see of the engine sharing 2 cores
with whoever tokenizes.

Reported per system and phase: every inter-token gap of every stream (p50, p99, max), TPOT, `/health`
p99, and the big requests' statuses and latencies; the figure is the ratio of loaded to quiet
inter-token p99 (target <= 1.20).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
import urllib.error
import urllib.request
import zlib

from cluster.bench.alone import process_tree, wait_gone
from cluster.bench.runner import random_prompts
from cluster.bench.servers import VLLM_PYTHON, free_port, start_ours, start_vllm, stop_server, write_report
from model.config import load_config

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bankers".split()


def big_bodies(count: int, megabytes: float) -> list[tuple[str, bytes]]:
    """(path, body) pairs: alternately a chat completion and a text completion of about `megabytes` MB."""
    size = int(megabytes * 1024 * 1024)
    bodies = []
    for i in range(count):
        words = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(size // 5 + 1)]
        text = " ".join(words)[:size]
        if i % 2 == 0:
            body = {"model": "bench", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}
            path = "/v1/chat/completions"
        else:
            body = {"model": "bench", "max_tokens": 1, "prompt": text}
            path = "/v1/completions"
        bodies.append((path, json.dumps(body).encode()))
    return bodies


def _send_at(base: str, path: str, body: bytes, at: float, results: list) -> None:
    time.sleep(max(0.0, at - time.monotonic()))
    start = time.monotonic()
    request = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    results.append((status, time.monotonic() - start))


def _probe_health(base: str, stop: threading.Event, latencies: list) -> None:
    while True:  # one reading at least, however short the phase
        start = time.monotonic()
        try:
            urllib.request.urlopen(base + "/health", timeout=60).read()
            latencies.append(time.monotonic() - start)
        except OSError:
            pass
        if stop.wait(0.2):
            return


async def _streams(base: str, prompts: list[list[int]], concurrency: int, output_len: int) -> dict:
    """Streamed greedy completions, at most `concurrency` at once: every inter-token gap, and TPOT."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=1800)
    gate, gaps, tpots = asyncio.Semaphore(concurrency), [], []

    async def one(prompt):
        async with gate:
            stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=output_len,
                                                     temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True, "return_token_ids": True})
            arrivals = []
            async for chunk in stream:
                if chunk.choices and (chunk.choices[0].model_extra or {}).get("token_ids"):
                    arrivals.append(time.perf_counter())
            gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
            tpots.append((arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1))

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()
    return {"wall_s": time.perf_counter() - start, "gaps": gaps, "tpot_ms": statistics.median(tpots) * 1e3}


def _phase(args, loop, base: str, phase: str, rep: int) -> dict:
    prompts = random_prompts(2 * args.concurrency, args.prompt_len, args.vocab,
                             seed=zlib.crc32(f"{phase}/{rep}".encode()))
    results, senders = [], []
    if phase == "loaded":
        # the big requests arrive over the first ~60% of the streaming phase, evenly
        spread = args.output_len * 2 * args.expected_step_s * 0.6
        now = time.monotonic() + 1.0
        for i, (path, body) in enumerate(args.bodies):
            at = now + spread * i / max(1, len(args.bodies) - 1)
            senders.append(threading.Thread(target=_send_at, args=(base, path, body, at, results), daemon=True))
        for sender in senders:
            sender.start()
    stop, health = threading.Event(), []
    probe = threading.Thread(target=_probe_health, args=(base, stop, health), daemon=True)
    probe.start()
    try:
        got = loop.run_until_complete(_streams(base, prompts, args.concurrency, args.output_len))
    finally:
        stop.set()
        probe.join()
        for sender in senders:
            sender.join()
    gaps = sorted(got.pop("gaps"))
    row = {**got, "gap_p50_ms": _pct(gaps, 50), "gap_p99_ms": _pct(gaps, 99), "gap_max_ms": gaps[-1] * 1e3,
           "gaps": len(gaps), "health_p99_ms": _pct(sorted(health), 99)}
    if results:
        row["big_statuses"] = sorted({str(s) for s, _ in results})
        row["big_latency_p50_s"] = statistics.median(t for _, t in results)
        row["big_latency_max_s"] = max(t for _, t in results)
    return row


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))] * 1e3


def _markdown(out: dict) -> str:
    lines = [f"# bench bodies: {out['concurrency']} streams, {out['big_requests']} requests of "
             f"{out['body_mb']} MB arriving among them", "",
             "| server | phase | inter-token p50 ms | p99 ms | max ms | TPOT ms | /health p99 ms | big requests: "
             "status, p50 / max s |", "|---|---|---|---|---|---|---|---|"]
    for name, result in out["systems"].items():
        for phase in ("quiet", "loaded"):
            m = result["median"][phase]
            big = (f"{', '.join(result['rounds'][-1][phase].get('big_statuses', []))}, "
                   f"{m['big_latency_p50_s']:.2f} / {m['big_latency_max_s']:.2f}" if phase == "loaded" else "-")
            lines.append(f"| {name} | {phase} | {m['gap_p50_ms']:.1f} | {m['gap_p99_ms']:.1f} | {m['gap_max_ms']:.1f} | "
                         f"{m['tpot_ms']:.1f} | {m['health_p99_ms']:.1f} | {big} |")
    lines.append("")
    for name, result in out["systems"].items():
        per_round = ", ".join(f"{r['loaded']['gap_p99_ms'] / r['quiet']['gap_p99_ms']:.2f}x" for r in result["rounds"])
        lines.append(f"- {name}: loaded / quiet inter-token p99 **{result['p99_ratio']:.2f}x** (rounds: {per_round})")
    lines += ["", "Target for ours: at most 1.20x. Medians over rounds; each server alone.", ""]
    return "\n".join(lines)


def _measure(args, loop, name: str, rep: int, rounds: dict) -> None:
    """One round of one server: started alone, warmed, both phases in this round's order, stopped."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logs = argparse.Namespace(**{**vars(args), "concurrency": [args.concurrency]})
    if name == "maverick":
        proc = start_ours(logs, 0, None, port, free_port(), tokenizer=True, log_name="maverick-serve-bodies")
    else:
        proc = start_vllm(logs, port, tokenizer=True)
    tree = [proc.pid, *process_tree(proc.pid)]
    try:
        loop.run_until_complete(_streams(base, random_prompts(4, args.prompt_len, args.vocab, seed=1), 4, 8))
        order = ("quiet", "loaded") if rep % 2 == 0 else ("loaded", "quiet")
        rounds[name].append({phase: _phase(args, loop, base, phase, rep) for phase in order})
    finally:
        stop_server(proc)
        wait_gone(tree)
    print(json.dumps({"server": name, "round": rep + 1, **{p: {k: round(v, 1) for k, v in r.items() if k.endswith("ms")}
                                                          for p, r in rounds[name][-1].items()}}), flush=True)


def _summary(rounds: list[dict]) -> dict:
    median = {phase: {key: statistics.median(r[phase][key] for r in rounds)
                      for key in rounds[0][phase] if isinstance(rounds[0][phase][key], float)}
              for phase in ("quiet", "loaded")}
    return {"rounds": rounds, "median": median,
            "p99_ratio": statistics.median(r["loaded"]["gap_p99_ms"] / r["quiet"]["gap_p99_ms"] for r in rounds)}


def main(args: argparse.Namespace) -> int:
    names = ["maverick"] + (["vllm"] if "vllm" in args.peers else [])
    if "vllm" in names and not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make bench` builds it, or pass --peers none")
    args.vocab = load_config(args.model).vocab_size
    args.bodies = big_bodies(args.big_requests, args.body_mb)
    args.concurrency = max(args.concurrency)
    args.expected_step_s = 0.06  # where the big requests land: a 32-stream step on 2 cores
    loop, rounds = asyncio.new_event_loop(), {name: [] for name in names}
    try:
        for rep in range(args.repeat):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                _measure(args, loop, name, rep, rounds)
    finally:
        loop.close()
    out = {"concurrency": args.concurrency, "big_requests": args.big_requests, "body_mb": args.body_mb,
           "output_len": args.output_len, "prompt_len": args.prompt_len, "repeat": args.repeat,
           "systems": {name: _summary(r) for name, r in rounds.items()},
           "machine": {"cpus": os.cpu_count(), "threads": args.threads}}
    write_report(args.output, out, _markdown(out))
    return 0
