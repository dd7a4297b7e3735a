"""`maverick bench ep --skew S --eplb`: the same gang on a skewed checkpoint, without EPLB and with it.

The checkpoint is `--model` with its routers skewed as `make-tiny --router-skew S` does, written once
beside it (`checkpoints/bench-skew16`): every MoE layer's router sends most tokens to a hot pair of
experts, which the contiguous layout puts on one expert rank. Gangs of the same layout (without eplb,
with it) run each alone (`cluster.bench.alone.run_rounds`): started, warmed, measured at every level on
the same prompts and stopped, the first gang rotating by round; `--repeat` rounds, medians reported,
every round kept. Per level and gang:
- the gang's step time (the attention rank's median step);
- the slowest expert rank's compute per step: each expert rank's step wall time less its waits in
  collectives, per step with work, the largest over the ranks (what EPLB exists to lower);
- balancedness per MoE layer from the ranks' own token counts (mean over max tokens per rank).
Before the levels, an EPLB gang warms up at the top level until it has switched placement at least
once; the steps of its first rebalance (decision, staging, switch), from the last round, are reported
against the steps around them.

A third gang (`--weight-read-rows`, on unless 0) runs the policy that counts each copy's weight read
(`eplb.weight_read_rows`), with the read's cost in rows measured here: `measure_weight_read_rows`
times an expert's FFN at the checkpoint's shapes on one thread with 1 row and with 64, cycling over
more experts than the cache holds, as an expert rank reads them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, save_file

from cluster.bench.alone import System, run_rounds
from cluster.bench.ep import _Gang, gang_layout
from cluster.bench.expert_copy import copy_paths
from cluster.bench.runner import random_prompts
from cluster.config import EplbConfig
from cluster.local_ray import ensure_local_ray
from cluster.terminal import StepLine
from model.config import load_config
from model.moe import expert_ffn
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


def measure_weight_read_rows(model: str | Path, experts: int = 24, rows: int = 64, repeat: int = 5) -> float:
    """One expert's weight read, in rows of its FFN's compute, on one thread, weights out of cache."""
    c = load_config(model)
    gate_up = [torch.randn(c.hidden_size, 2 * c.intermediate_size) for _ in range(experts)]
    down = [torch.randn(c.intermediate_size, c.hidden_size) for _ in range(experts)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def per_expert_s(n: int) -> float:
            x = torch.randn(n, c.hidden_size)
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                for w1, w2 in zip(gate_up, down):
                    expert_ffn(x, w1, w2)
                times.append((time.perf_counter() - start) / experts)
            return statistics.median(times)

        one, many = per_expert_s(1), per_expert_s(rows)
    finally:
        torch.set_num_threads(threads)
    per_row = max(1e-9, (many - one) / (rows - 1))
    return max(0.0, one - per_row) / per_row


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


def _gang_system(args, loop, vocab: int, name: str, make_gang, steps: StepLine) -> System:
    """One gang as a system of `run_rounds`: started alone for its part of a round, warmed (an eplb gang
    until it has switched placement once), measured at every level, stopped."""
    top = random_prompts(max(args.concurrency), args.prompt_len, vocab, seed=1)

    def start() -> tuple[_Gang, dict | None]:
        gang = make_gang()
        loop.run_until_complete(gang.supervisor.start())
        if name == "static":
            loop.run_until_complete(gang.measure(top[:2]))
            return gang, None
        return gang, loop.run_until_complete(first_rebalance(gang, top, steps))

    def measure_level(handle, door: str, c: int, rep: int) -> dict:
        return loop.run_until_complete(measure(handle[0], random_prompts(c, args.prompt_len, vocab, seed=c)))

    return System(name, start, measure_level, lambda handle: loop.run_until_complete(handle[0].supervisor.stop()))


def _rows(args, names: list[str], samples: dict[str, dict[int, list[dict]]], steps: StepLine) -> list[dict]:
    results = []
    for c in args.concurrency:
        row = {"concurrency": c}
        for name in names:
            rs = samples[name][c]
            for key in ("tok_s", "step_ms", "slowest_expert_compute_ms", "slowest_expert_cpu_ms", "balancedness"):
                row[f"{name}_{key}"] = statistics.median(r[key] for r in rs)
            row[f"{name}_runs"] = rs
        for name in names[1:]:
            for ratio, key in (("slowest_compute_ratio", "slowest_expert_compute_ms"),
                               ("slowest_cpu_ratio", "slowest_expert_cpu_ms"), ("step_ratio", "step_ms")):
                row[f"{name}_{ratio}"] = row[f"static_{key}"] / row[f"{name}_{key}"]
            steps.print(f"bench ep --eplb  concurrency {c}: slowest expert rank's compute per step, static / "
                        f"{name} {row[f'{name}_slowest_compute_ratio']:.2f}x (CPU time "
                        f"{row[f'{name}_slowest_cpu_ratio']:.2f}x), gang step {row[f'{name}_step_ratio']:.2f}x, "
                        f"balancedness {row['static_balancedness']:.2f} -> {row[f'{name}_balancedness']:.2f}")
        results.append(row)
    return results


def main(args) -> int:
    layout = gang_layout(args)
    model = skewed_checkpoint(args.model, args.skew)
    vocab = load_config(model).vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    eplb = EplbConfig(redundant_experts=args.redundant_experts, rebalance_every_steps=args.rebalance_every_steps)
    weight_read_rows = (measure_weight_read_rows(model) if args.weight_read_rows == "measure"
                        else float(args.weight_read_rows))
    by_reads = eplb.model_copy(update={"weight_read_rows": weight_read_rows})
    configs = {"static": None, "eplb": eplb, **({"eplb_reads": by_reads} if weight_read_rows > 0 else {})}
    started = ensure_local_ray(num_cpus=max(4, sum(layout)))  # one gang at a time, half a logical CPU per rank
    loop, steps = asyncio.new_event_loop(), StepLine()
    try:
        systems = [_gang_system(args, loop, vocab, name, lambda e=e: _Gang(args, params, layout, model=str(model),
                                                                           eplb=e), steps)
                   for name, e in configs.items()]
        rounds = run_rounds(systems, args.concurrency, args.repeat, "ep --eplb", steps,
                            after_round=lambda system, handle, rep: handle[1])
        results = _rows(args, list(configs), rounds.samples, steps)
        rebalance = {name: rounds.extras[name] for name in configs if name != "static"}
    finally:
        steps.close()
        loop.close()
        if started:
            ray.shutdown()
    copy = copy_paths(str(model))  # after the gangs: nothing else running
    report = {"results": results, "rebalance": rebalance, "copy": copy, "skew": args.skew, "checkpoint": str(model),
              "layout": {"attention_workers": layout[0], "expert_workers": layout[1], "backend": "gloo"},
              "eplb": eplb.model_dump(), "weight_read_rows": weight_read_rows,
              "machine": {"cores": __import__("os").cpu_count(), "torch": torch.__version__},
              "load": {"prompt_len": args.prompt_len, "output_len": args.output_len, "repeat": args.repeat}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


POLICIES = {"eplb": "rows (published greedy)", "eplb_reads": "rows + weight reads"}


def render(report: dict) -> str:
    lay, e = report["layout"], report["eplb"]
    names = [n for n in POLICIES if f"{n}_step_ms" in report["results"][0]]
    lines = [f"# EPLB on a skewed checkpoint (router skew {report['skew']:g}): {lay['attention_workers']} attention + "
             f"{lay['expert_workers']} expert workers, gloo, without eplb and with it "
             f"(redundant_experts {e['redundant_experts']}, rebalance_every_steps {e['rebalance_every_steps']})", "",
             f"Medians of {report['load']['repeat']} rounds per level on the same prompts, each gang alone (started, "
             "warmed, measured and stopped for its part of a round; the first gang rotates by round). The policy "
             f"that counts weight reads ran with weight_read_rows {report.get('weight_read_rows', 0):.1f} "
             "(one expert's weight read in rows of compute, measured here).", "",
             "| concurrency | eplb policy | slowest expert rank compute ms/step, wall (static, eplb) | ratio | the same "
             "in CPU time | ratio | gang step ms (static, eplb) | ratio | balancedness (static, eplb) | tok/s "
             "(static, eplb) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for n in names:
            lines.append(f"| {r['concurrency']} | {POLICIES[n]} | {r['static_slowest_expert_compute_ms']:.2f}, "
                         f"{r[f'{n}_slowest_expert_compute_ms']:.2f} | {r[f'{n}_slowest_compute_ratio']:.2f}x | "
                         f"{r['static_slowest_expert_cpu_ms']:.2f}, {r[f'{n}_slowest_expert_cpu_ms']:.2f} | "
                         f"{r[f'{n}_slowest_cpu_ratio']:.2f}x | "
                         f"{r['static_step_ms']:.1f}, {r[f'{n}_step_ms']:.1f} | {r[f'{n}_step_ratio']:.2f}x | "
                         f"{r['static_balancedness']:.2f}, {r[f'{n}_balancedness']:.2f} | "
                         f"{r['static_tok_s']:.1f}, {r[f'{n}_tok_s']:.1f} |")
    for n in names:
        rb = report["rebalance"][n]
        if not rb["rebalanced"]:
            lines += ["", f"The gang with eplb by {POLICIES[n]} did not rebalance during the warm-up."]
            continue
        lines += ["", f"Eplb by {POLICIES[n]}, the first rebalance: {rb['decision_to_switch_s']:.2f} s from decision "
                      f"to switch over {rb['staging_steps']} staging step(s); {rb['bytes_read'] / 1e6:.1f} MB read by "
                      f"the expert ranks per rebalance ({rb['rebalances']} so far)"
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
