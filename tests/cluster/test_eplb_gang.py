"""Live expert rebalancing in a real gang (1 attention + 3 expert ranks, 2 spare slots each) on the
skewed checkpoint: the tokens equal `transformers` across rebalances, every replica holds its
original's bytes, the hot pair ends replicated, and every rank follows the one table."""

import asyncio

import pytest
import ray
import torch

from cluster.config import EngineLimits, EplbConfig, GangConfig, RankResources
from cluster.gang import initial_placement
from cluster.supervisor import GangSupervisor
from model.config import load_config
from model.router_skew import HOT_PAIR
from model.tiny import make_tiny
from tests.cluster.test_gang import rebuilt
from tests.oracle import hf_greedy
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

SKEW = 16.0  # the hot pair takes about 85% of the tokens (tests/model/test_router_skew.py)
RANK = RankResources(num_cpus=0.25, torch_threads=1)
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    from transformers import Llama4ForCausalLM

    ckpt = make_tiny(tmp_path_factory.mktemp("skewed") / "ckpt", "tiny-maverick", seed=1, dtype=torch.float32,
                     router_skew=SKEW)
    hf = Llama4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    return ckpt, hf


def prompts(vocab: int, bos: int, num: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[bos] + torch.randint(0, vocab, (20,), generator=gen).tolist() for _ in range(num)]


async def generate(supervisor, prompt):
    ids = []
    async for out in supervisor.generate(GenerateRequest(prompt, SamplingParams(temperature=0.0,
                                                                                max_tokens=NEW_TOKENS,
                                                                                ignore_eos=True))):
        assert out.error is None, out.error
        ids += out.new_token_ids
    return ids


def gang_config(ckpt, eplb: EplbConfig | None) -> GangConfig:
    return GangConfig(model=str(ckpt), attention_workers=1, expert_workers=3, placement_strategy="SPREAD",
                      attention=RANK, experts=RANK, skip_tokenizer_init=True, collective_timeout_s=20,
                      engine=EngineLimits(block_size=8, kv_cache_memory=16 * 2**20), eplb=eplb)


async def asleep(gang, timeout_s: float = 60) -> None:
    """Until every rank sleeps with no rebalance staging: a rank that finishes staging after the gang
    went idle wakes it to switch, so the table and the slots read next are those every rank follows."""
    for _ in range(int(timeout_s / 0.1)):
        waves = await asyncio.gather(*(r.wave_state.remote() for r in gang.ranks))
        stats = await asyncio.gather(*(r.stats.remote() for r in gang.ranks))
        if all(w["idle"] for w in waves) and not any((s["eplb"] or {}).get("staging") for s in stats):
            return
        await asyncio.sleep(0.1)
    states = [(w, {k: (s["eplb"] or {}).get(k) for k in ("staging", "rebalances", "unchanged", "switches")})
              for w, s in zip(waves, stats)]
    raise TimeoutError(f"the gang was not idle with no rebalance staging within {timeout_s:g}s: {states}")


def test_a_gang_rebalancing_live_generates_what_transformers_does(ray_cluster, skewed):
    ckpt, hf = skewed
    config = gang_config(ckpt, EplbConfig(redundant_experts=2, rebalance_every_steps=4, min_gain=0))
    rounds = [prompts(hf.config.vocab_size, hf.config.bos_token_id, 8, seed) for seed in (0, 1, 2)]

    async def main():
        supervisor = GangSupervisor(config)
        await supervisor.start()
        try:
            outputs = [await asyncio.gather(*(generate(supervisor, p) for p in ps)) for ps in rounds]
            gang = supervisor.gang
            await asleep(gang)
            attention = ray.get(gang.attention[0].stats.remote())
            experts = ray.get([r.stats.remote() for r in gang.experts])
            digests = ray.get([r.expert_digests.remote() for r in gang.experts])
            return outputs, attention, experts, digests
        finally:
            await supervisor.stop()

    outputs, attention, experts, digests = asyncio.run(main())
    for ps, got in zip(rounds, outputs):
        assert got == [hf_greedy(hf, p, NEW_TOKENS) for p in ps]
    eplb = attention["eplb"]
    assert eplb["rebalances"] >= 2, eplb  # switched twice at least, every rank at the same step
    assert all(e["eplb"]["rebalances"] == eplb["rebalances"] for e in experts)
    assert sum(e["eplb"]["bytes_total"] for e in experts) > 0
    table = attention["placement"]
    for layer, ranks_E in table.items():
        # the table every rank follows is what each expert rank holds, slots within capacity
        for i, e in enumerate(experts):  # expert rank i is group rank i
            assert e["experts_by_layer"][layer] == [x for x, ranks in enumerate(ranks_E) if i in ranks]
            assert len(e["experts_by_layer"][layer]) <= [5, 5, 4][i]
        assert all(len(ranks_E[h]) >= 2 for h in HOT_PAIR), ranks_E  # the hot pair is replicated
        # a replica holds exactly its original's bytes
        for expert, ranks in enumerate(ranks_E):
            assert len({digests[rank][layer][expert] for rank in ranks}) == 1


def test_fp8_experts_rebalance_and_generate_what_the_static_placement_does(ray_cluster, tmp_path):
    """FP8 experts stay FP8 through a rebalance (their per-row scales move with them): the tokens of
    a rebalancing gang equal those of the same gang laid out contiguously. The gang runs the policy
    that counts weight reads, whose placements may leave spare slots free."""
    ckpt = make_tiny(tmp_path / "fp8", "tiny-maverick", seed=1, fp8=True, router_skew=SKEW)
    ps = prompts(2048, 1, 8, seed=3)

    async def run(eplb):
        supervisor = GangSupervisor(gang_config(ckpt, eplb))
        await supervisor.start()
        try:
            out = await asyncio.gather(*(generate(supervisor, p) for p in ps))
            await asleep(supervisor.gang)
            return out, ray.get(supervisor.gang.experts[0].stats.remote())
        finally:
            await supervisor.stop()

    static, _ = asyncio.run(run(None))
    moved, stats = asyncio.run(run(EplbConfig(redundant_experts=2, rebalance_every_steps=4, min_gain=0,
                                              weight_read_rows=6)))
    assert stats["eplb"]["rebalances"] >= 1 and stats["eplb"]["bytes_total"] > 0
    assert moved == static


def test_a_rank_replaced_after_a_rebalance_loads_the_table_the_survivors_follow(ray_cluster, skewed):
    """A killed expert rank's replacement reads the experts the survivors' current table gives it,
    not the placement the gang started with, and the gang's tokens stay those of transformers."""
    ckpt, hf = skewed
    config = gang_config(ckpt, EplbConfig(redundant_experts=2, rebalance_every_steps=4, min_gain=0))
    before, after = (prompts(hf.config.vocab_size, hf.config.bos_token_id, 8, seed) for seed in (4, 5))

    async def main():
        supervisor = GangSupervisor(config, health_period_s=0.5)
        await supervisor.start()
        try:
            await asyncio.gather(*(generate(supervisor, p) for p in before))
            await asleep(supervisor.gang)
            table = ray.get(supervisor.gang.attention[0].placement_table.remote())
            ray.kill(supervisor.gang.experts[0], no_restart=True)
            await rebuilt(supervisor)
            held = ray.get(supervisor.gang.experts[0].stats.remote())["experts_by_layer"]
            out = await asyncio.gather(*(generate(supervisor, p) for p in after))
            return table, held, out
        finally:
            await supervisor.stop()

    table, held, out = asyncio.run(main())
    config_ = load_config(ckpt)
    assert table != initial_placement(config, config_.moe_layers, config_.num_experts).table  # it had moved
    assert held == {layer: [e for e, ranks in enumerate(ranks_E) if 0 in ranks] for layer, ranks_E in table.items()}
    assert out == [hf_greedy(hf, p, NEW_TOKENS) for p in after]
