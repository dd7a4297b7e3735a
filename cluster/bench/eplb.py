"""`maverick bench ep --skew S --eplb`: the same gang on a skewed checkpoint, without EPLB and with it.

The checkpoint is `--model` with its routers skewed as `make-tiny --router-skew S` does, written once
beside it (`checkpoints/bench-skew16`): every MoE layer's router sends most tokens to a hot pair of
experts, which the contiguous layout puts on one expert rank. Two gangs of the same layout stay loaded and are
measured in turn on the same prompts (an idle gang waits on events); `--repeat` rounds per level,
medians reported. Per level and gang:
- the gang's step time (the attention rank's median step);
- the slowest expert rank's compute per step: each expert rank's step wall time less its waits in
  collectives, per step with work, the largest over the ranks (what EPLB exists to lower);
- balancedness per MoE layer from the ranks' own token counts (mean over max tokens per rank).
Before the levels, the EPLB gang warms up at the top level until it has switched placement at least
once; the steps of that first rebalance (decision, staging, switch) are reported against the steps
around them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, save_file

from cluster.bench.ep import _Gang, gang_layout
from cluster.bench.expert_copy import copy_paths
from cluster.bench.runner import random_prompts
from cluster.config import EplbConfig
from cluster.offline import ensure_local_ray
from cluster.terminal import StepLine, format_step
from model.config import load_config
from model.router_skew import skew_routers
from workers.expert_placement import balancedness
from workers.sampling_params import SamplingParams

WARM_ROUNDS = 4  # warm-up runs at the top level before giving up on seeing a rebalance


def skewed_checkpoint(model: str | Path, skew: float) -> Path:
    """`model` with its routers skewed (`model.router_skew`, seed 0), written once beside it; every
    other tensor and file is copied as it is."""
    src = Path(model)
    out = src.with_name(f"{src.name}-skew{skew:g}")
    if (out / "config.json").is_file():
        return out
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no checkpoint here (maverick make-tiny {src} --preset bench --layout causal)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for shard in sorted(tmp.glob("*.safetensors")):
        tensors = load_file(shard)
        routers = {k: v.float() for k, v in tensors.items() if k.endswith("feed_forward.router.weight")}
        if routers:
            skewed = skew_routers(routers, skew, seed=0)
            save_file({**tensors, **{k: v.to(tensors[k].dtype) for k, v in skewed.items()}}, shard,
                      metadata={"format": "pt"})
    tmp.rename(out)  # whole or not at all: a run cut off midway leaves no half-skewed checkpoint
    return out


async def expert_counters(gang: _Gang) -> list[dict]:
    return await asyncio.gather(*(r.stats.remote() for r in gang.supervisor.gang.experts))


async def measure(gang: _Gang, prompts: list[list[int]]) -> dict:
    before = await expert_counters(gang)
    row = await gang.measure(prompts)
    after = await expert_counters(gang)
    def per_step(key: str) -> list[float]:
        return [(a[key] - b[key]) / max(1, a["steps_served"] - b["steps_served"]) for b, a in zip(before, after)]

    per_rank, per_rank_cpu = per_step("compute_seconds"), per_step("compute_cpu_seconds")
    # tokens each expert rank served per MoE layer in this run: [rank][layer]
    tokens = [[sum(x - y for x, y in zip(la, lb)) for la, lb in zip(a["expert_load"], b["expert_load"])]
              for b, a in zip(before, after)]
    layers = [balancedness([rank[layer] for rank in tokens]) for layer in range(len(tokens[0]))]
    return {**row, "slowest_expert_compute_ms": max(per_rank) * 1e3, "expert_compute_ms": [s * 1e3 for s in per_rank],
            "slowest_expert_cpu_ms": max(per_rank_cpu) * 1e3, "expert_cpu_ms": [s * 1e3 for s in per_rank_cpu],
            "balancedness": statistics.mean(layers)}


async def first_rebalance(gang: _Gang, prompts: list[list[int]], steps: StepLine) -> dict:
    """Warm the EPLB gang at the top level until it switched placement once; that rebalance's steps."""
    for round_ in range(1, WARM_ROUNDS + 1):
        steps.show(f"bench ep --eplb  warm-up until the first rebalance  round {round_}")
        await gang.measure(prompts)
        stats = await gang.supervisor.gang.attention[0].stats.remote()
        eplb = stats["eplb"]
        if eplb["rebalances"]:
            break
    else:
        return {"rebalanced": False}
    # 1 attention rank: its timed steps are the rebalancer's steps with work, in order, since start
    times = stats["step_seconds"] if stats["steps_timed"] == len(stats["step_seconds"]) else None
    decided, switched = eplb["switches"][0]  # the first rebalance: from the start placement to a measured one
    experts = await expert_counters(gang)
    out = {"rebalanced": True, "decision_to_switch_s": eplb["seconds_total"] / eplb["rebalances"],
           "install_ms": max(e["eplb"]["install_seconds_total"] for e in experts) / eplb["rebalances"] * 1e3,
           "bytes_read": sum(e["eplb"]["bytes_total"] for e in experts) / eplb["rebalances"],
           "staging_steps": switched - decided, "rebalances": eplb["rebalances"]}
    if times and switched < len(times):
        during = times[decided:switched + 1]  # staging, then the switch step (0-based: step k is times[k - 1])
        others = times[:decided] + times[switched + 1:]
        out.update({"staging_step_ms_max": max(during) * 1e3, "switch_step_ms": during[-1] * 1e3,
                    "steps_around_switch_ms": [t * 1e3 for t in times[max(0, switched - 3):switched + 4]],
                    "other_step_ms_median": statistics.median(others[1:] or others) * 1e3})
    return out


async def _run(args, vocab: int, gangs: dict[str, _Gang]) -> tuple[list[dict], dict]:
    steps = StepLine()
    try:
        for name, gang in gangs.items():
            steps.show(f"bench ep --eplb  {name}  starting")
            await gang.supervisor.start()
        top = random_prompts(max(args.concurrency), args.prompt_len, vocab, seed=1)
        await gangs["static"].measure(top[:2])
        rebalance = await first_rebalance(gangs["eplb"], top, steps)
        results = []
        for level, c in enumerate(args.concurrency, 1):
            prompts = random_prompts(c, args.prompt_len, vocab, seed=c)
            runs = {name: [] for name in gangs}
            for rep in range(1, args.repeat + 1):
                for name, gang in gangs.items():
                    steps.show(format_step("ep --eplb", name, c, level, len(args.concurrency), rep, args.repeat))
                    runs[name].append(await measure(gang, prompts))
            row = {"concurrency": c}
            for name, rs in runs.items():
                for key in ("tok_s", "step_ms", "slowest_expert_compute_ms", "slowest_expert_cpu_ms", "balancedness"):
                    row[f"{name}_{key}"] = statistics.median(r[key] for r in rs)
                row[f"{name}_runs"] = rs
            row["slowest_compute_ratio"] = row["static_slowest_expert_compute_ms"] / row["eplb_slowest_expert_compute_ms"]
            row["slowest_cpu_ratio"] = row["static_slowest_expert_cpu_ms"] / row["eplb_slowest_expert_cpu_ms"]
            row["step_ratio"] = row["static_step_ms"] / row["eplb_step_ms"]
            results.append(row)
            steps.print(f"bench ep --eplb  concurrency {c}: slowest expert rank's compute per step, static / eplb "
                        f"{row['slowest_compute_ratio']:.2f}x, gang step {row['step_ratio']:.2f}x, "
                        f"balancedness {row['static_balancedness']:.2f} -> {row['eplb_balancedness']:.2f}")
    finally:
        steps.close()
        for gang in gangs.values():
            await gang.supervisor.stop()
    return results, rebalance


def main(args) -> int:
    layout = gang_layout(args)
    model = skewed_checkpoint(args.model, args.skew)
    vocab = load_config(model).vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    eplb = EplbConfig(redundant_experts=args.redundant_experts, rebalance_every_steps=args.rebalance_every_steps)
    started = ensure_local_ray(num_cpus=max(4, sum(layout)))  # two gangs, half a logical CPU per rank
    try:
        gangs = {"static": _Gang(args, params, layout, model=str(model)),
                 "eplb": _Gang(args, params, layout, model=str(model), eplb=eplb)}
        results, rebalance = asyncio.run(_run(args, vocab, gangs))
    finally:
        if started:
            ray.shutdown()
    copy = copy_paths(str(model))  # after the gangs: nothing else running
    report = {"results": results, "rebalance": rebalance, "copy": copy, "skew": args.skew, "checkpoint": str(model),
              "layout": {"attention_workers": layout[0], "expert_workers": layout[1], "backend": "gloo"},
              "eplb": eplb.model_dump(), "machine": {"cores": __import__("os").cpu_count(), "torch": torch.__version__},
              "load": {"prompt_len": args.prompt_len, "output_len": args.output_len, "repeat": args.repeat}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def render(report: dict) -> str:
    lay, e = report["layout"], report["eplb"]
    lines = [f"# EPLB on a skewed checkpoint (router skew {report['skew']:g}): {lay['attention_workers']} attention + "
             f"{lay['expert_workers']} expert workers, gloo, without and with eplb "
             f"(redundant_experts {e['redundant_experts']}, rebalance_every_steps {e['rebalance_every_steps']})", "",
             f"Medians of {report['load']['repeat']} interleaved rounds per level on the same prompts.", "",
             "| concurrency | slowest expert rank compute ms/step, wall (static, eplb) | ratio | the same in "
             "CPU time | ratio | gang step ms (static, eplb) | ratio | balancedness (static, eplb) | tok/s (static, eplb) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['concurrency']} | {r['static_slowest_expert_compute_ms']:.2f}, "
                     f"{r['eplb_slowest_expert_compute_ms']:.2f} | {r['slowest_compute_ratio']:.2f}x | "
                     f"{r['static_slowest_expert_cpu_ms']:.2f}, {r['eplb_slowest_expert_cpu_ms']:.2f} | "
                     f"{r['slowest_cpu_ratio']:.2f}x | "
                     f"{r['static_step_ms']:.1f}, {r['eplb_step_ms']:.1f} | {r['step_ratio']:.2f}x | "
                     f"{r['static_balancedness']:.2f}, {r['eplb_balancedness']:.2f} | "
                     f"{r['static_tok_s']:.1f}, {r['eplb_tok_s']:.1f} |")
    rb = report["rebalance"]
    if not rb["rebalanced"]:
        lines += ["", "The EPLB gang did not rebalance during the warm-up."]
    else:
        lines += ["", f"The first rebalance: {rb['decision_to_switch_s']:.2f} s from decision to switch over "
                      f"{rb['staging_steps']} staging step(s); {rb['bytes_read'] / 1e6:.1f} MB read by the expert ranks per "
                      f"rebalance ({rb['rebalances']} so far)"
                  + (f"; its slowest step {rb['staging_step_ms_max']:.1f} ms and the switch step "
                     f"{rb['switch_step_ms']:.1f} ms against a median {rb['other_step_ms_median']:.1f} ms for the "
                     f"other steps of that run" if "switch_step_ms" in rb else "")
                  + f"; putting the staged experts in took {rb['install_ms']:.1f} ms of the switch step."]
    c = report["copy"]
    lines += ["", f"Where staging should read experts on this machine: the hot pair of every MoE layer "
                  f"({c['bytes'] / 1e6:.1f} MB) by byte range from the checkpoint in {c['checkpoint_ms']:.1f} ms "
                  f"({c['checkpoint_gb_s']:.2f} GB/s, page cache), from a peer process over gloo in "
                  f"{c['peer_gloo_ms']:.1f} ms ({c['peer_gloo_gb_s']:.2f} GB/s): the {c['faster']} is faster."]
    return "\n".join(lines + [""])
