"""`maverick bench ep`: a gang (1 attention + 2 expert workers, gloo) against the single-process
engine, on the same checkpoint and load.

Per concurrency level: output tok/s and the median step time of each, the all-to-all share of a gang
step (time the attention rank waits in collectives), then the CPU an idle gang uses and the latency
of waking it. The single-process engine runs first in this process; the gang runs on a local Ray
with its ranks pinned to threads so that the three processes share the cores without fighting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from pathlib import Path

import ray
import torch

from cluster.bench.runner import random_prompts
from cluster.config import EngineLimits, GangConfig, RankResources
from cluster.offline import ensure_local_ray
from cluster.supervisor import GangSupervisor
from model.config import load_config
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def _single(args, vocab: int, params: SamplingParams) -> dict[int, dict]:
    torch.set_num_threads(args.threads)
    engine = LLMEngine.from_model_dir(args.model, EngineConfig(max_num_seqs=max(args.concurrency),
                                                               max_num_batched_tokens=4096),
                                      skip_tokenizer_init=True)
    out = {}
    for c in [1] + args.concurrency:  # the first pass warms up
        for p in random_prompts(c, args.prompt_len, vocab, seed=c):
            engine.submit(GenerateRequest(p, params))
        steps, tokens, start = [], 0, time.perf_counter()
        while engine.has_work():
            t0 = time.perf_counter()
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            steps.append(time.perf_counter() - t0)
        out[c] = {"tok_s": tokens / (time.perf_counter() - start), "step_ms": statistics.median(steps[1:]) * 1e3}
    return out


async def _gang(args, vocab: int, params: SamplingParams) -> tuple[dict[int, dict], dict]:
    config = GangConfig(model=str(args.model), attention_workers=1, expert_workers=2,
                        attention=RankResources(num_cpus=0.5, torch_threads=args.threads),
                        experts=RankResources(num_cpus=0.5, torch_threads=1), skip_tokenizer_init=True,
                        engine=EngineLimits(max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096))
    supervisor = GangSupervisor(config, rebuild=False)
    await supervisor.start()
    attention = supervisor.gang.attention[0]

    async def run(prompt):
        n = 0
        async for out in supervisor.generate(GenerateRequest(prompt, params)):
            n += len(out.new_token_ids)
        return n

    out = {}
    try:
        for c in [1] + args.concurrency:
            before = await attention.stats.remote()
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(run(p) for p in random_prompts(c, args.prompt_len, vocab, c))))
            seconds = time.perf_counter() - start
            after = await attention.stats.remote()
            steps = after["step_seconds"][len(before["step_seconds"]):] or after["step_seconds"][-1:]
            n_steps = max(1, after["steps"] - before["steps"])
            out[c] = {"tok_s": tokens / seconds, "step_ms": statistics.median(steps[1:] or steps) * 1e3,
                      "alltoall_ms": (after["alltoall_seconds"] - before["alltoall_seconds"]) / n_steps * 1e3}
        idle = await _idle_and_wake(supervisor, run)
    finally:
        await supervisor.stop()
    return out, idle


async def _idle_and_wake(supervisor: GangSupervisor, run) -> dict:
    await asyncio.sleep(1.5)  # all ranks go idle together
    ranks = supervisor.gang.ranks
    before = await asyncio.gather(*[r.cpu_seconds.remote() for r in ranks])
    await asyncio.sleep(5.0)
    after = await asyncio.gather(*[r.cpu_seconds.remote() for r in ranks])
    start = time.perf_counter()
    async for _ in supervisor.generate(GenerateRequest([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=1))):
        break
    return {"idle_cpu_share": sum(a - b for a, b in zip(after, before)) / 5.0,
            "wake_to_first_token_ms": (time.perf_counter() - start) * 1e3}


def main(args) -> int:
    vocab = load_config(args.model).vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    single = _single(args, vocab, params)
    started = ensure_local_ray()
    try:
        gang, idle = asyncio.run(_gang(args, vocab, params))
    finally:
        if started:
            ray.shutdown()
    results = [{"concurrency": c, "single_tok_s": single[c]["tok_s"], "single_step_ms": single[c]["step_ms"],
                "gang_tok_s": gang[c]["tok_s"], "gang_step_ms": gang[c]["step_ms"],
                "alltoall_ms": gang[c]["alltoall_ms"],
                "alltoall_share": gang[c]["alltoall_ms"] / gang[c]["step_ms"],
                "gang_over_single_step": gang[c]["step_ms"] / single[c]["step_ms"]} for c in args.concurrency]
    report = {"results": results, "idle": idle, "layout": {"attention_workers": 1, "expert_workers": 2,
                                                           "backend": "gloo"},
              "machine": {"cores": __import__("os").cpu_count(), "torch": torch.__version__},
              "load": {"prompt_len": args.prompt_len, "output_len": args.output_len}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Expert-parallel benchmark: gang (1 attention + 2 expert workers, gloo) vs one process", "",
             "| concurrency | single tok/s | gang tok/s | single step ms | gang step ms | gang / single step "
             "| all-to-all ms per step | all-to-all share |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['concurrency']} | {r['single_tok_s']:.1f} | {r['gang_tok_s']:.1f} | "
                     f"{r['single_step_ms']:.1f} | {r['gang_step_ms']:.1f} | {r['gang_over_single_step']:.2f}x | "
                     f"{r['alltoall_ms']:.1f} | {r['alltoall_share']:.0%} |")
    lines += ["", f"Idle gang: {idle['idle_cpu_share']:.1%} of one core over 5 s (all ranks together); "
              f"waking it to the first token of a 3-token prompt: {idle['wake_to_first_token_ms']:.0f} ms.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0
