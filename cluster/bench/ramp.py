"""`maverick bench serve --ramp`: gangs that follow load against a fixed single gang, under a load of
1 stream, then `--ramp-streams`, then 1 again (each phase `--ramp-seconds` long).

Each deployment runs alone (`cluster.bench.alone`): `maverick serve` is started, driven through the
three phases, stopped, and its process tree waited out before the other starts; `--repeat` rounds,
the order alternating, every round's figures kept and medians reported. Per phase: TTFT p50 and p99,
tok/s, requests and errors; for the autoscaled one also the gangs ready over time, the time from the
busy phase's start to a second gang serving (scale up), and from the quiet phase's start to one gang
again (scale down, the drain included).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import urllib.request

from cluster.bench.alone import process_tree, wait_gone
from cluster.bench.servers import free_port, start_ours, stop_server, timing, write_report

POLL_S = 0.5  # between reads of the gangs ready


def autoscaling(args) -> dict:
    return {"min_gangs": 1, "max_gangs": args.ramp_max_gangs, "target_load": 0.75, "upscale_delay_s": 5,
            "downscale_delay_s": 15, "metrics_interval_s": 1, "drain_grace_s": 10}


def deployments(args) -> dict[str, dict]:
    """The app args each deployment changes from bench serve's own."""
    engine = {"max_num_seqs": args.ramp_seqs, "max_num_batched_tokens": 4096}
    return {"static": {"engine": engine, "num_gangs": 1},
            "autoscaled": {"engine": engine, "autoscaling": autoscaling(args), "graceful_shutdown_timeout_s": 60}}


def gangs_ready(url: str) -> int:
    """Gangs ready as the ingress exports them (`maverick_gang_ready` on the serving port's /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(1 for line in text.splitlines() if line.startswith("maverick_gang_ready{") and line.endswith(" 1.0"))


async def phase(url: str, args, streams: int, seconds: float, seed: int) -> dict:
    """`streams` clients, each sending one streamed completion after another until `seconds` pass."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=args.timeout)
    rng = random.Random(seed)
    records, errors = [], []
    start = time.perf_counter()
    deadline = start + seconds

    async def one_client() -> None:
        while time.perf_counter() < deadline:
            prompt = [rng.randrange(10, args.vocab) for _ in range(args.prompt_len)]
            begin, arrivals = time.perf_counter(), []
            try:
                stream = await client.completions.create(
                    model="bench", prompt=prompt, max_tokens=args.output_len, temperature=0, stream=True,
                    extra_body={"ignore_eos": True, "return_token_ids": True})
                async for chunk in stream:
                    if chunk.choices:
                        ids = (chunk.choices[0].model_extra or {}).get("token_ids")
                        arrivals.append((time.perf_counter(), len(ids) if ids is not None else 1))
                records.append(timing(begin, arrivals))
            except Exception as exc:  # counted, never hidden
                errors.append(repr(exc))

    try:
        await asyncio.gather(*(one_client() for _ in range(streams)))
    finally:
        await client.close()
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in records) or [float("nan")]
    return {"streams": streams, "requests": len(records), "errors": len(errors), "error_examples": errors[:3],
            "tok_s": sum(r[2] for r in records) / wall, "ttft_p50_ms": statistics.median(ttfts) * 1e3,
            "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1e3, "wall_s": wall}


async def drive(url: str, args) -> tuple[list[dict], list[tuple[float, int]]]:
    timeline: list[tuple[float, int]] = []
    origin = time.perf_counter()

    async def watch() -> None:
        while True:
            ready = await asyncio.to_thread(gangs_ready, url)
            timeline.append((time.perf_counter() - origin, ready))
            await asyncio.sleep(POLL_S)

    watcher = asyncio.create_task(watch())
    phases = []
    try:
        for i, streams in enumerate((1, args.ramp_streams, 1)):
            began = time.perf_counter() - origin
            phases.append({"began_s": began, **await phase(url, args, streams, args.ramp_seconds, seed=i)})
    finally:
        watcher.cancel()
    return phases, timeline


def first_time(timeline: list[tuple[float, int]], after: float, test) -> float | None:
    return next((t - after for t, n in timeline if t >= after and test(n)), None)


def run(args, name: str, changes: dict) -> dict:
    port, grpc_port = free_port(), free_port()
    before = set(process_tree())
    proc = start_ours(args, args.expert_workers[0], None, port, grpc_port, log_name=f"ramp-{name}", changes=changes)
    tree = [p for p in process_tree() if p not in before]
    try:
        phases, timeline = asyncio.run(drive(f"http://127.0.0.1:{port}", args))
    finally:
        tree += [p for p in process_tree() if p not in before and p not in tree]
        stop_server(proc)
        wait_gone(tree)
    out = {"phases": phases, "gangs_ready": timeline, "max_gangs_ready": max((n for _, n in timeline), default=0)}
    if name == "autoscaled":
        out["scale_up_s"] = first_time(timeline, phases[1]["began_s"], lambda n: n >= 2)
        out["scale_down_s"] = first_time(timeline, phases[2]["began_s"], lambda n: n == 1)
    return out


def medians(rounds: list[dict]) -> dict:
    """Per phase, the median over rounds of each figure (errors summed), and every round's figures."""
    phases = []
    for i in range(len(rounds[0]["phases"])):
        each = [r["phases"][i] for r in rounds]
        phases.append({**{k: statistics.median(p[k] for p in each) for k in ("tok_s", "ttft_p50_ms", "ttft_p99_ms")},
                       "requests": sum(p["requests"] for p in each), "errors": sum(p["errors"] for p in each)})
    out = {"phases": phases, "rounds": rounds, "max_gangs_ready": max(r["max_gangs_ready"] for r in rounds)}
    for key in ("scale_up_s", "scale_down_s"):
        seen = [r[key] for r in rounds if r.get(key) is not None]
        if key in rounds[0]:
            out[key] = statistics.median(seen) if len(seen) == len(rounds) else None  # None: some round never did
    return out


def markdown(out: dict) -> str:
    rows = []
    for name, result in out["deployments"].items():
        labels = ("1 stream", f"{out['ramp_streams']} streams", "1 stream again")
        for i, (label, p) in enumerate(zip(labels, result["phases"])):
            rounds = ", ".join(f"{r['phases'][i]['tok_s']:.0f}" for r in result["rounds"])
            rows.append([name, label, f"{p['tok_s']:.1f} ({rounds})", f"{p['ttft_p50_ms']:.0f}",
                         f"{p['ttft_p99_ms']:.0f}", str(p["requests"]), str(p["errors"])])
    head = ["deployment", "phase", "tok/s (rounds)", "TTFT p50 ms", "TTFT p99 ms", "requests", "errors"]
    text = "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])
    auto = out["deployments"].get("autoscaled", {})

    def secs(v):
        return "not in every round" if v is None else f"{v:.1f} s"

    return (f"# bench serve --ramp\n\n{text}\n\nMedians of {out['repeat']} round(s), the order alternating; "
            f"requests and errors summed. Autoscaled: most gangs ready {auto.get('max_gangs_ready')}; a second "
            f"gang serving {secs(auto.get('scale_up_s'))} after the busy phase began; one gang again "
            f"{secs(auto.get('scale_down_s'))} after the quiet phase began (drain included). Each phase "
            f"{out['ramp_seconds']:.0f} s, prompts of {out['prompt_len']} and outputs of {out['output_len']} "
            f"tokens, max_num_seqs {out['ramp_seqs']} per gang; each deployment alone.\n")


def main(args) -> int:
    from model.config import load_config

    args.vocab = load_config(args.model).vocab_size
    systems = list(deployments(args).items())
    rounds: dict[str, list[dict]] = {name: [] for name, _ in systems}
    for rep in range(args.repeat):
        shift = rep % len(systems)  # no deployment always runs first
        for name, changes in systems[shift:] + systems[:shift]:
            rounds[name].append(run(args, name, changes))
    out = {"ramp_streams": args.ramp_streams, "ramp_seconds": args.ramp_seconds, "ramp_seqs": args.ramp_seqs,
           "prompt_len": args.prompt_len, "output_len": args.output_len, "repeat": args.repeat,
           "autoscaling": autoscaling(args), "deployments": {name: medians(r) for name, r in rounds.items()}}
    write_report(args.output, out, markdown(out))
    return 0
