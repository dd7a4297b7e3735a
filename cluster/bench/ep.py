"""`maverick bench ep`: a gang (1 attention + 2 expert workers, gloo; `--attention-workers`, `--expert-workers`)
against the single-process engine, on the same checkpoint and load; and the same gang with ping-pong
micro-batches (`overlap`: `microbatches: 2`, every step of two requests or more split).

Per concurrency level: output tok/s and the median step time of each, the all-to-all share of a gang
step (time the attention rank waits in collectives), then the CPU an idle gang uses and the latency
of waking it; last, a decode step's collectives alone, nothing computed, for 1A+2E and 1A+1E
(`cluster.bench.collectives`). Single and gangs stay loaded and are measured in turn, `repeat` rounds
per level on the same prompts, medians reported (this machine drifts by +-20% minutes apart). The
single engine runs in this process at `--threads`; the gang on a local Ray, every rank at one
intra-op thread (as deployed on CPUs; attention workers at `--attention-threads`) so that its
processes share the cores without fighting, idle between its runs.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import ray
import torch

from cluster.bench import plots
from cluster.bench.collectives import collectives_alone
from cluster.bench.runner import random_prompts
from cluster.config import EngineLimits, EplbConfig, GangConfig, RankResources
from cluster.local_ray import ensure_local_ray
from cluster.supervisor import GangSupervisor
from cluster.terminal import StepLine, format_step
from model.config import load_config
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams



class _Single:
    """The single-process engine, in this process; idle (costing nothing) while the gang runs."""

    def __init__(self, args, params: SamplingParams):
        torch.set_num_threads(args.threads)
        self.params = params
        self.engine = LLMEngine.from_model_dir(args.model, EngineConfig(max_num_seqs=max(args.concurrency),
                                                                        max_num_batched_tokens=4096),
                                               skip_tokenizer_init=True)

    def measure(self, prompts: list[list[int]]) -> dict:
        for p in prompts:
            self.engine.submit(GenerateRequest(p, self.params))
        steps, tokens, start = [], 0, time.perf_counter()
        while self.engine.has_work():
            t0 = time.perf_counter()
            tokens += sum(len(o.new_token_ids) for o in self.engine.step())
            steps.append(time.perf_counter() - t0)
        return {"tok_s": tokens / (time.perf_counter() - start), "step_ms": statistics.median(steps[1:]) * 1e3}


def gang_layout(args) -> tuple[int, int]:
    """The gang's (attention, expert) workers: `--attention-workers` and the largest `--expert-workers`
    (bench serve's list also holds 0)."""
    experts = max(args.expert_workers)
    if experts < 1:
        raise ValueError("bench ep needs a gang with expert workers: --expert-workers 1 or more")
    if args.attention_workers < 1:
        raise ValueError("bench ep needs a gang with attention workers: --attention-workers 1 or more")
    return args.attention_workers, experts


class _Gang:
    """The gang on Ray, driven by its supervisor in this process; idle (waiting on events) between runs."""

    def __init__(self, args, params: SamplingParams, layout: tuple[int, int], microbatches: int = 1,
                 model: str | None = None, eplb: EplbConfig | None = None):
        self.params = params
        # every rank at one thread, as deployed on CPUs (deploy/tiny-cpu.yaml): 3 ranks share the 2 cores. The
        # attention rank at 2 threads (the single engine's count) was slower at 8 and 32 (gang/single 1.93-1.99x
        # and 1.63-1.71x against 1.69-1.70x and 1.43-1.46x, two runs; its second thread takes a core from the
        # expert ranks while they compute) and at 1 as fast or a little faster (2.20x / 2.13x against 2.38x / 2.14x)
        # `--attention-threads`, `--attention-workers` and `--expert-workers` try other layouts (README)
        experts = RankResources(num_cpus=0.5, torch_threads=1)
        attention = RankResources(num_cpus=0.5, torch_threads=args.attention_threads)
        self.config = GangConfig(model=str(model or args.model), attention_workers=layout[0],
                                 expert_workers=layout[1], attention=attention, experts=experts,
                                 skip_tokenizer_init=True, eplb=eplb,
                                 engine=EngineLimits(max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096,
                                                     microbatches=microbatches, microbatch_min_tokens=2))
        self.supervisor = GangSupervisor(self.config, rebuild=False)

    async def run(self, prompt: list[int]) -> int:
        n = 0
        async for out in self.supervisor.generate(GenerateRequest(prompt, self.params)):
            n += len(out.new_token_ids)
        return n

    async def measure(self, prompts: list[list[int]]) -> dict:
        ranks = self.supervisor.gang.attention
        befores = await asyncio.gather(*(r.stats.remote() for r in ranks))
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(self.run(p) for p in prompts)))
        seconds = time.perf_counter() - start
        afters = await asyncio.gather(*(r.stats.remote() for r in ranks))
        # attention ranks step in lock-step: the one that computed most steps times the gang's step
        before, after = max(zip(befores, afters), key=lambda ba: ba[1]["engine_steps"] - ba[0]["engine_steps"])
        steps = after["step_seconds"][len(before["step_seconds"]):] or after["step_seconds"][-1:]
        n_steps = max(1, after["steps"] - before["steps"])
        return {"tok_s": tokens / seconds, "step_ms": statistics.median(steps[1:] or steps) * 1e3,
                "alltoall_ms": (after["alltoall_seconds"] - before["alltoall_seconds"]) / n_steps * 1e3,
                "microbatched_steps": sum(a["microbatched_steps"] - b["microbatched_steps"]
                                          for b, a in zip(befores, afters))}


async def _interleaved(args, vocab: int, single: _Single, gangs: dict[str, _Gang]) -> tuple[list[dict], dict]:
    """Per level, `repeat` rounds of single, gang, overlap on the same prompts; medians of each figure."""
    steps = StepLine()
    for name, gang in gangs.items():
        steps.show(f"bench ep  {name}  starting")
        await gang.supervisor.start()
    try:
        steps.show("bench ep  warm-up")
        warm = random_prompts(2, args.prompt_len, vocab, seed=1)
        single.measure(warm)
        for gang in gangs.values():
            await gang.measure(warm)
        results = []
        for level, c in enumerate(args.concurrency, 1):
            prompts = random_prompts(c, args.prompt_len, vocab, seed=c)
            runs = {"single": [], **{name: [] for name in gangs}}
            for rep in range(1, args.repeat + 1):
                steps.show(format_step("ep", "single", c, level, len(args.concurrency), rep, args.repeat))
                runs["single"].append(single.measure(prompts))
                for name, gang in gangs.items():
                    steps.show(format_step("ep", name, c, level, len(args.concurrency), rep, args.repeat))
                    runs[name].append(await gang.measure(prompts))
            med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
            row = {"concurrency": c, "single_tok_s": med["single"]["tok_s"], "single_step_ms": med["single"]["step_ms"]}
            for name in gangs:
                row.update({f"{name}_tok_s": med[name]["tok_s"], f"{name}_step_ms": med[name]["step_ms"],
                            f"{name}_alltoall_ms": med[name]["alltoall_ms"],
                            f"{name}_alltoall_share": med[name]["alltoall_ms"] / med[name]["step_ms"],
                            f"{name}_over_single_step": med[name]["step_ms"] / med["single"]["step_ms"],
                            f"{name}_over_single_step_runs": [g["step_ms"] / s["step_ms"]
                                                              for s, g in zip(runs["single"], runs[name])],
                            f"{name}_microbatched_steps": sum(r["microbatched_steps"] for r in runs[name])})
            row["alltoall_ms"], row["alltoall_share"] = row["gang_alltoall_ms"], row["gang_alltoall_share"]
            results.append(row)
            steps.print(f"bench ep  concurrency {c}: gang/single step {row['gang_over_single_step']:.2f}x, "
                        f"overlap/single {row['overlap_over_single_step']:.2f}x")
        steps.show("bench ep  gang  idle CPU and wake-up")
        idle = await _idle_and_wake(gangs["gang"].supervisor, gangs["gang"].run)
    finally:
        steps.close()
        for gang in gangs.values():
            await gang.supervisor.stop()
    return results, idle


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
    attention_workers, expert_workers = layout = gang_layout(args)  # a bad layout fails before anything loads
    config = load_config(args.model)
    vocab = config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    single = _Single(args, params)
    # two gangs whose ranks ask for half a logical CPU each
    started = ensure_local_ray(num_cpus=max(4, attention_workers + expert_workers))
    try:
        gangs = {"gang": _Gang(args, params, layout), "overlap": _Gang(args, params, layout, microbatches=2)}
        results, idle = asyncio.run(_interleaved(args, vocab, single, gangs))
    finally:
        if started:
            ray.shutdown()
    # after the gangs: a decode step of c requests routes c x top-k rows per MoE layer
    steps = StepLine()
    for experts in (2, 1):
        steps.show(f"bench ep  collectives alone  1 attention + {experts} expert processes")
        step_ms = collectives_alone(experts, config.hidden_size, config.moe_layers, config.num_experts,
                                    [c * config.num_experts_per_tok for c in args.concurrency])
        for row, ms in zip(results, step_ms):
            row[f"collectives_alone_e{experts}_ms"] = ms
    steps.close()
    report = {"results": results, "idle": idle,
              "layout": {"attention_workers": attention_workers, "expert_workers": expert_workers, "backend": "gloo",
                         "attention_threads": args.attention_threads, "expert_threads": 1,
                         "single_threads": args.threads},
              "machine": {"cores": __import__("os").cpu_count(), "torch": torch.__version__},
              "load": {"prompt_len": args.prompt_len, "output_len": args.output_len, "repeat": args.repeat}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Expert-parallel benchmark: gang ({attention_workers} attention worker(s) at "
             f"{args.attention_threads} thread(s) + "
             f"{expert_workers} expert workers, gloo) vs one process", "",
             f"Medians of {args.repeat} interleaved rounds per level (single, gang, then the gang with two "
             "micro-batches per step, on the same prompts).", "",
             "| concurrency | single tok/s | gang tok/s | overlap tok/s | single step ms | gang step ms "
             "| overlap step ms | gang / single step | overlap / single step | all-to-all share (gang, overlap) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['concurrency']} | {r['single_tok_s']:.1f} | {r['gang_tok_s']:.1f} | "
                     f"{r['overlap_tok_s']:.1f} | {r['single_step_ms']:.1f} | {r['gang_step_ms']:.1f} | "
                     f"{r['overlap_step_ms']:.1f} | {r['gang_over_single_step']:.2f}x | "
                     f"{r['overlap_over_single_step']:.2f}x | {r['gang_alltoall_share']:.0%}, "
                     f"{r['overlap_alltoall_share']:.0%} |")
    lines += ["", f"Idle gang: {idle['idle_cpu_share']:.1%} of one core over 5 s (all ranks together); "
              f"waking it to the first token of a 3-token prompt: {idle['wake_to_first_token_ms']:.0f} ms.", "",
              "A decode step's collectives alone (medians, nothing computed between them; separate processes "
              "at one thread, gloo), beside the gang's step and its wait in collectives:", "",
              "| concurrency | gang step ms | gang all-to-all ms | alone, 1A+2E ms | alone, 1A+1E ms |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['gang_step_ms']:.1f} | {r['gang_alltoall_ms']:.1f} | "
              f"{r['collectives_alone_e2_ms']:.1f} | {r['collectives_alone_e1_ms']:.1f} |" for r in results]
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    plots.write_beside(report, out)  # the step split, as PNG
    return 0
