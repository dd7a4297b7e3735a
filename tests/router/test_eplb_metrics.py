"""Issue 36's balancedness, measured on a real Prometheus scrape: two gangs (1 attention + 3 expert
ranks) on the skewed checkpoint take the same greedy load, one with the contiguous placement and one
with eplb (2 spare slots per expert rank). Balancedness per MoE layer (mean over max, across expert
ranks, of the tokens each served) is PromQL on `maverick_expert_rank_layer_tokens_total`, over a
window that starts once the eplb gang has rebalanced: below 0.5 without eplb, at least 0.9 with it.

The load is random prompts, one greedy token each, in steps of 256 tokens: random prompt tokens route
alike in every window, so the window a rebalance plans from looks like the one measured; and big
steps, because `replica_of_rows` gives the rows left over from an even split to an expert's first
replicas at every call, a bias that small steps make visible (0.89 to 0.93 in steps of 64 tokens).
"""

import asyncio
import json
from pathlib import Path

import pytest
import ray
import torch

from cluster.config import EngineLimits, EplbConfig, GangConfig, RankResources
from cluster.probe import wait_until
from cluster.supervisor import GangSupervisor
from model.tiny import make_tiny
from router.cli.top import PrometheusSource
from tests.router import conftest
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(600)
APP = "skew"
SKEW = 16.0  # the hot pair (experts 0 and 1, both on the first expert rank when contiguous) takes ~85%
RANK = RankResources(num_cpus=0.25, torch_threads=1)
PROMPTS, PROMPT_LEN = 8, 64  # a round: 512 prompt tokens, in 2 steps


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("skewed") / "ckpt", "tiny-maverick", seed=1, dtype=torch.float32,
                     router_skew=SKEW)


@pytest.fixture(scope="module")
def prometheus(ray_with_metrics, tmp_path_factory):
    server = conftest.scrape_ray(tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()


def gang_config(ckpt, eplb: EplbConfig | None) -> GangConfig:
    return GangConfig(model=str(ckpt), attention_workers=1, expert_workers=3, attention=RANK, experts=RANK,
                      skip_tokenizer_init=True,
                      engine=EngineLimits(block_size=8, kv_cache_memory=16 * 2**20, max_num_batched_tokens=256),
                      eplb=eplb)


def round_of_prompts(ckpt: Path, seed: int) -> list[list[int]]:
    text = json.loads((ckpt / "config.json").read_text())["text_config"]
    gen = torch.Generator().manual_seed(seed)
    return [[text["bos_token_id"]] + torch.randint(0, text["vocab_size"], (PROMPT_LEN - 1,), generator=gen).tolist()
            for _ in range(PROMPTS)]


async def run_round(supervisor: GangSupervisor, seed: int) -> None:
    async def one(prompt):
        request = GenerateRequest(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        async for out in supervisor.generate(request):
            assert out.error is None, out.error

    await asyncio.gather(*(one(p) for p in round_of_prompts(Path(supervisor.config.model), seed)))


def tokens_served(supervisor: GangSupervisor) -> int:
    """Rows the gang's expert ranks served, all MoE layers: what Prometheus must reach."""
    return sum(sum(map(sum, s["expert_load"])) for s in ray.get([r.stats.remote() for r in supervisor.gang.experts]))


def scraped_at(prometheus, supervisor: GangSupervisor) -> float:
    """Waits until Prometheus holds the gang's every served token; returns the time of that sample. The
    ranks' own count is read again at each try: an expert rank may publish its last step's rows after
    the attention rank has streamed that step's tokens."""
    promql = f'sum(ray_maverick_expert_rank_layer_tokens_total{{application="{APP}",gang="{supervisor.name}"}})'

    def caught_up():
        total = tokens_served(supervisor)
        result = prometheus.query(promql)
        return result and float(result[0]["value"][1]) == total and result[0]["value"][0]

    return float(wait_until(caught_up, 120, f"Prometheus to scrape every token {supervisor.name} served"))


def balancedness(prometheus, gang: str, since: float) -> dict[str, float]:
    """Per MoE layer: mean / max over expert ranks of the tokens served since `since`."""
    served = f'ray_maverick_expert_rank_layer_tokens_total{{application="{APP}",gang="{gang}"}}'
    window = f"(sum by (layer, rank) ({served}) - sum by (layer, rank) ({served} @ {since:.3f}))"
    return {r["metric"]["layer"]: float(r["value"][1])
            for r in prometheus.query(f"avg by (layer) ({window}) / max by (layer) ({window})")}


async def measure(prometheus, config: GangConfig, name: str) -> dict[str, float]:
    supervisor = GangSupervisor(config, name=name, application=APP)
    await supervisor.start()
    try:
        seed = 0
        # warm-up: the rounds before the window, until an eplb gang has switched to a placement it measured
        while True:
            await run_round(supervisor, seed)
            seed += 1
            if config.eplb is None:
                break
            eplb = (await supervisor.gang.attention[0].stats.remote())["eplb"]
            if eplb["rebalances"] >= 1:
                break
            assert seed < 10, f"{name}: no rebalance after {seed} rounds: {eplb}"
        since = await asyncio.to_thread(scraped_at, prometheus, supervisor)
        for _ in range(3):
            await run_round(supervisor, seed)
            seed += 1
        await asyncio.to_thread(scraped_at, prometheus, supervisor)
        return balancedness(prometheus, name, since)
    finally:
        await supervisor.stop()


def test_eplb_lifts_balancedness_on_the_skewed_workload_from_below_half_to_ninety_percent(skewed, prometheus):
    plain = asyncio.run(measure(prometheus, gang_config(skewed, None), "contiguous"))
    balanced = asyncio.run(measure(prometheus, gang_config(skewed, EplbConfig(redundant_experts=2,
                                                                             rebalance_every_steps=4)), "eplb"))
    print(f"balancedness by MoE layer: contiguous {plain}, eplb {balanced}")
    assert plain.keys() == balanced.keys() and plain, (plain, balanced)
    assert all(b < 0.5 for b in plain.values()), plain
    assert all(b >= 0.9 for b in balanced.values()), balanced
    # maverick top shows the eplb gang's balancedness; the rebalance series are the eplb gang's only
    top = [line for line in PrometheusSource(prometheus.url, APP, "10m").lines() if line.startswith("eplb:")]
    assert len(top) == 1 and "balancedness (served -> planned)" in top[0], top
    assert prometheus.query(f'ray_maverick_eplb_rebalances_total{{application="{APP}",gang="contiguous"}}') == []
