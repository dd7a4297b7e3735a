"""A gang (1 attention + E expert workers) on its own local Ray, driven in-process by a `GangSupervisor`,
with no HTTP: `bench serve`'s reference for a gang layout, run as its own process tree so that it is
measured alone (`cluster/bench/alone.py`).

    python -m cluster.bench.gang_runner --model DIR --expert-workers E [--threads 2]

Same line protocol as `cluster/bench/runner.py`: prints `{"ready": ...}` once warm, then one
`{"result": ...}` line per `{"concurrency": c, "seed": s, "requests": n}` read from stdin: n requests
of `--prompt-len` random tokens, at most c at once, `--output-len` greedy tokens each (EOS ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


async def _round(supervisor, prompts: list[list[int]], concurrency: int, output_len: int) -> dict:
    from cluster.bench.servers import bounded, timing
    from workers.protocol import GenerateRequest
    from workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def one(prompt):
        start, arrivals = time.perf_counter(), []
        async for batch in supervisor.generate_batches(GenerateRequest(prompt, params)):
            arrivals.append((time.perf_counter(), sum(len(o.new_token_ids) for o in batch)))
        return timing(start, arrivals)

    return await bounded(prompts, concurrency, one)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--expert-workers", type=int, required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from cluster.bench.runner import random_prompts
    from cluster.config import EngineLimits, GangConfig, RankResources
    from cluster.local_ray import ensure_local_ray
    from cluster.supervisor import GangSupervisor
    from model.config import load_config

    ensure_local_ray()
    vocab = load_config(args.model).vocab_size
    config = GangConfig(model=args.model, expert_workers=args.expert_workers, skip_tokenizer_init=True,
                        attention=RankResources(num_cpus=0.5, torch_threads=args.threads),
                        engine=EngineLimits(max_num_seqs=args.max_concurrency, max_num_batched_tokens=4096))
    supervisor = GangSupervisor(config, rebuild=False)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(supervisor.start())
    try:
        loop.run_until_complete(_round(supervisor, random_prompts(2, args.prompt_len, vocab, seed=99), 2, 4))
        print(json.dumps({"ready": f"gang E={args.expert_workers}"}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            c = command["concurrency"]
            prompts = random_prompts(command.get("requests") or c, args.prompt_len, vocab, command["seed"])
            result = loop.run_until_complete(_round(supervisor, prompts, c, args.output_len))
            print(json.dumps({"result": {"concurrency": c, **result}}), flush=True)
    finally:
        loop.run_until_complete(supervisor.stop())
        loop.close()


if __name__ == "__main__":
    main()
