"""`maverick bench chaos`: how long each fault pauses the streams, on `maverick serve`.

Each layout (one gang; one gang with `--spares` warm expert and as many attention processes; with
`--two-gangs`, two gangs) is its own `maverick serve`, started alone for each round and stopped after it
(`../shared/PEERS.md`: rounds alternate between the layouts, the first rotating), with its Ray's GCS on
a known port, which this process joins to find the ranks' processes. Per fault and round it runs
`--streams` greedy HTTP streams twice: without a fault (the tokens every stream must repeat), then with
the fault injected once every stream has its first token. The faults: SIGKILL or SIGSTOP of an expert
rank or of an attention rank, and SIGKILL of the gang's Serve replica. Reported per fault: the longest
pause any stream saw, the p50 and p99 (nearest rank: under 100 streams, the longest) of each stream's
longest pause, the streams equal to the fault-free run, the requests the ingress resumed, and the
recovery's checkpoint bytes and seconds by stage. A stopped process is killed after its case, and the
next case waits for every gang to be ready.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import signal
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from cluster.bench.alone import process_tree, wait_gone
from cluster.bench.runner import random_prompts
from cluster.bench.servers import free_port, start_ours, stop_server, write_report
from cluster.serve_config import APP_NAME
from model.config import load_config

FAULTS = {  # name -> (whose process, signal)
    "sigkill-expert": ("expert", signal.SIGKILL), "sigstop-expert": ("expert", signal.SIGSTOP),
    "sigkill-attention": ("attention", signal.SIGKILL), "sigstop-attention": ("attention", signal.SIGSTOP),
    "kill-gang-replica": ("replica", signal.SIGKILL),
}
TWO_GANG_FAULTS = ("sigkill-expert", "sigstop-expert")


async def _streams(base: str, prompts: list[list[int]], output_len: int, fault=None) -> list[dict]:
    """Every prompt as one greedy stream at once; `fault()` once all have a first token. Per stream:
    its token ids and its longest gap between tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=1800)
    started, all_started = [0], asyncio.Event()

    async def one(prompt):
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=output_len,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True})
        ids, arrivals = [], []
        async for chunk in stream:
            got = chunk.choices and (chunk.choices[0].model_extra or {}).get("token_ids")
            if not got:
                continue
            ids += got
            arrivals.append(time.monotonic())
            if len(arrivals) == 1:
                started[0] += 1
                if started[0] == len(prompts):
                    all_started.set()
        return {"ids": ids, "longest_gap_s": max((b - a for a, b in zip(arrivals, arrivals[1:])), default=0.0)}

    async def inject():
        await all_started.wait()
        fault()

    try:
        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        if fault is not None:
            tasks.append(asyncio.ensure_future(inject()))
        results = await asyncio.gather(*tasks)
    finally:
        await client.close()
    return results[:len(prompts)]


def _gangs(timeout_s: float = 60) -> list[dict]:
    """Every gang replica's stats (each names its gang, its ranks' pids and its replica's pid)."""
    from ray import serve

    from cluster.gang_pool import each_answer

    handle = serve.get_deployment_handle("gangs", APP_NAME)
    stats = asyncio.run(each_answer(handle, "stats", timeout_s))
    status = asyncio.run(each_answer(handle, "status", timeout_s))
    pids = {s["gang"]: s["pid"] for s in status if isinstance(s, dict)}
    return [{**s, "replica_pid": pids.get(s["gang"])} for s in stats if isinstance(s, dict)]


def _wait_ready(num_gangs: int, timeout_s: float, spares: int = 0) -> list[dict]:
    """Every gang ready with all its ranks, and with `spares` warm spares (expert and attention together)."""
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            gangs = _gangs()
            seen = [(g["gang"], g["state"]) for g in gangs]
        except Exception as exc:  # a replica starting, or one just killed
            gangs, seen = [], f"{type(exc).__name__}: {exc}"
        if len(gangs) == num_gangs and all(g["state"] == "ready" and g.get("ranks") and g.get("spares", 0) >= spares
                                           for g in gangs):
            return gangs
        time.sleep(1.0)
    raise TimeoutError(f"{num_gangs} gang(s) not ready within {timeout_s:g}s (last seen: {seen})")


def _victim(gang: dict, whose: str) -> int:
    ranks = gang["ranks"]
    if whose == "replica":
        return gang["replica_pid"]
    attention = [r for r in ranks if "running" in r]
    return (attention[-1] if whose == "attention" else next(r for r in ranks if "running" not in r))["pid"]


def _resumed() -> int:
    from ray import serve

    return serve.get_app_handle(APP_NAME).routing_stats.remote().result()["resume"]["resumed_requests"]


def _case(args, base: str, layout: dict, fault: str, round_no: int) -> dict:
    whose, sig = FAULTS[fault]
    prompts = random_prompts(args.streams, args.prompt_len, args.vocab, seed=1000 * round_no + len(fault))
    # a warm spare is measured warm: the one a previous fault's recovery took is replaced first
    gangs = _wait_ready(layout["num_gangs"], args.timeout, spares=2 * layout["spares"])
    expected = asyncio.run(_streams(base, prompts, args.output_len))
    gang = gangs[0]
    victim, resumed = _victim(gang, whose), _resumed()
    try:
        got = asyncio.run(_streams(base, prompts, args.output_len, lambda: os.kill(victim, sig)))
    finally:
        if sig == signal.SIGSTOP:
            try:
                os.kill(victim, signal.SIGKILL)  # recovery has replaced it; the process may linger stopped
            except ProcessLookupError:
                pass
    after = {g["gang"]: g for g in _wait_ready(layout["num_gangs"], args.timeout)}
    rebuilt = after.get(gang["gang"]) or next(iter(after.values()))
    gaps = sorted(s["longest_gap_s"] for s in got)
    row = {"layout": layout["name"], "fault": fault, "round": round_no, "longest_pause_s": gaps[-1],
           "pause_p50_s": statistics.median(gaps), "pause_p99_s": gaps[math.ceil(0.99 * len(gaps)) - 1],
           "exact": sum(g["ids"] == e["ids"] for g, e in zip(got, expected)), "streams": len(prompts),
           "resumed": _resumed() - resumed, "bytes_read": rebuilt["last_build_bytes"],
           "recovery_s": rebuilt["last_recovery_s"], "stages_s": rebuilt.get("last_build_stages_s", {}),
           "hangs_found": rebuilt.get("hangs_found", {}), "spares_adopted": rebuilt.get("spares_adopted", 0)}
    print(f"bench chaos  {layout['name']}  {fault}  round {round_no}/{args.repeat}: longest pause "
          f"{row['longest_pause_s']:.1f}s, {row['exact']}/{row['streams']} exact", flush=True)
    return row


def _layouts(args) -> list[dict]:
    layouts = [{"name": "1 gang", "num_gangs": 1, "spares": 0, "faults": args.faults}]
    if args.spares:
        layouts.append({"name": f"1 gang, spares {args.spares}", "num_gangs": 1, "spares": args.spares,
                        "faults": args.faults})
    if args.two_gangs:
        layouts.append({"name": "2 gangs", "num_gangs": 2, "spares": 0,
                        "faults": [f for f in args.faults if f in TWO_GANG_FAULTS]})
    return layouts


def _run_layout(args, layout: dict, round_no: int) -> list[dict]:
    """One `maverick serve` of this layout, alone, through every fault of one round; stopped after."""
    import ray

    from ray._private.services import get_node_ip_address

    port, grpc_port, gcs_port = free_port(), free_port(), free_port()
    changes = {"num_gangs": layout["num_gangs"], "spares": layout["spares"], "attention_spares": layout["spares"],
               "collective_timeout_s": 30}
    proc = start_ours(args, args.chaos_expert_workers, None, port, grpc_port, log_name=f"maverick-serve-chaos-"
                      f"{layout['name'].replace(' ', '').replace(',', '-')}", changes=changes,
                      env={"RAY_GCS_SERVER_PORT": str(gcs_port), "RAY_AUTH_MODE": "disabled"})
    pids = process_tree(proc.pid)
    rows = []
    try:
        os.environ["RAY_AUTH_MODE"] = "disabled"  # as the server's Ray: a token left in ~/.ray would not match
        ray.init(address=f"{get_node_ip_address()}:{gcs_port}", log_to_driver=False, logging_level="ERROR")
        for fault in layout["faults"]:
            rows.append(_case(args, f"http://127.0.0.1:{port}", layout, fault, round_no))
    finally:
        ray.shutdown()
        stop_server(proc)
        wait_gone(pids)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per layout and fault: the worst of the rounds' longest pauses, medians of the rest."""
    out = []
    for key in dict.fromkeys((r["layout"], r["fault"]) for r in rows):
        mine = [r for r in rows if (r["layout"], r["fault"]) == key]
        out.append({"layout": key[0], "fault": key[1], "longest_pause_s": max(r["longest_pause_s"] for r in mine),
                    "pause_p50_s": statistics.median(r["pause_p50_s"] for r in mine),
                    "pause_p99_s": statistics.median(r["pause_p99_s"] for r in mine),
                    "exact": f"{sum(r['exact'] for r in mine)}/{sum(r['streams'] for r in mine)}",
                    "resumed": sum(r["resumed"] for r in mine),
                    "bytes_read": statistics.median(r["bytes_read"] for r in mine),
                    # None: no recovery in place (a replica that died builds a whole new gang)
                    "recovery_s": statistics.median(recovered) if (recovered := [r["recovery_s"] for r in mine
                                                                                 if r["recovery_s"]]) else None,
                    "rounds_longest_pause_s": [r["longest_pause_s"] for r in mine]})
    return out


def markdown(args, summary: list[dict]) -> str:
    lines = [f"# bench chaos: {args.streams} greedy streams per fault, {args.output_len} tokens each, "
             f"{args.chaos_expert_workers} expert ranks + 1 attention rank per gang, {args.repeat} round(s)", "",
             "| layout | fault | longest pause (s) | p50 (s) | p99 (s) | exact | resumed | bytes read "
             "| recovery in place (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['layout']} | {s['fault']} | {s['longest_pause_s']:.2f} | {s['pause_p50_s']:.2f} | "
                     f"{s['pause_p99_s']:.2f} | {s['exact']} | {s['resumed']} | {s['bytes_read']:.0f} | "
                     f"{'—' if s['recovery_s'] is None else format(s['recovery_s'], '.1f')} |")
    lines += ["", "Every round's longest pause: " + "; ".join(
        f"{s['layout']} {s['fault']} {[round(x, 2) for x in s['rounds_longest_pause_s']]}" for s in summary), ""]
    return "\n".join(lines)


def main(args) -> int:
    args.vocab = load_config(args.model).vocab_size
    args.concurrency = [args.streams]  # each gang's max_num_seqs (`serve_config`)
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}: choose from {sorted(FAULTS)}")
    rows, layouts = [], _layouts(args)
    for round_no in range(1, args.repeat + 1):
        first = (round_no - 1) % len(layouts)  # the layout that starts the round rotates (PEERS.md)
        for layout in layouts[first:] + layouts[:first]:
            # a process per layout and round: Serve's handles in a driver outlive `ray.shutdown` and
            # would call the last layout's actors
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                rows += pool.submit(_run_layout, args, layout, round_no).result()
    summary = summarize(rows)
    out = {"streams": args.streams, "output_len": args.output_len, "prompt_len": args.prompt_len,
           "expert_workers": args.chaos_expert_workers, "rows": rows, "summary": summary}
    write_report(args.output, out, markdown(args, summary))
    return 0 if all(r["exact"] == r["streams"] for r in rows) else 1
