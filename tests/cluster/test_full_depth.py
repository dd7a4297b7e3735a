"""Maverick's full structure (48 layers, 24 MoE layers of 128 experts, 40/8 heads, the chunked/NoPE
pattern; tiny widths) served by a gang as wide as a real deployment's, 2 attention + 16 expert ranks
spread over 4 nodes of a real Ray cluster: greedy tokens equal transformers'. It also prints each rank
process's memory and the decode step time (the README's full-depth figures come from this test, `-s`)."""

import asyncio
import os
import time

import psutil
import pytest
import ray
import torch

from cluster.config import EngineLimits, GangConfig, RankResources
from cluster.supervisor import GangSupervisor
from model.tiny import make_tiny
from tests.cluster.conftest import multi_node_cluster
from tests.oracle import hf_greedy
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

ATTENTION, EXPERTS, NODES = 2, 16, 4
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def four_nodes():
    yield from multi_node_cluster(NODES, 1)


@pytest.fixture(scope="module")
def full_depth(tmp_path_factory):
    from transformers import Llama4ForCausalLM

    ckpt = make_tiny(tmp_path_factory.mktemp("full-depth") / "ckpt", "maverick-full-depth", seed=3,
                     dtype=torch.float32)
    hf = Llama4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    return ckpt, hf


async def _collect(supervisor, prompt):
    ids = []
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    async for out in supervisor.generate(GenerateRequest(prompt, params)):
        ids += out.new_token_ids
    return ids


def test_full_depth_gang_over_four_nodes_equals_transformers(four_nodes, full_depth):
    ckpt, hf = full_depth
    config = hf.config
    assert (config.num_hidden_layers, config.num_local_experts, config.num_attention_heads,
            config.num_key_value_heads) == (48, 128, 40, 8)
    assert config.no_rope_layers[:4] == [1, 1, 1, 0] and config.moe_layers == list(range(1, 48, 2))
    bos = config.bos_token_id
    prompts = [[bos] + list(range(100 + 13 * i, 100 + 13 * i + 9 * (5 + 3 * i), 9)) for i in range(4)]
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]

    gang = GangConfig(model=str(ckpt), attention_workers=ATTENTION, expert_workers=EXPERTS,
                      placement_strategy="SPREAD", skip_tokenizer_init=True, collective_timeout_s=120,
                      attention=RankResources(num_cpus=0.1, torch_threads=1),
                      experts=RankResources(num_cpus=0.1, torch_threads=1),
                      engine=EngineLimits(block_size=16, kv_cache_memory=8 * 2**20))

    async def main():
        supervisor = GangSupervisor(gang)
        await supervisor.start()
        try:
            ranks = supervisor.gang.ranks
            nodes = set(ray.get([r.node_id.remote() for r in ranks]))
            pids = ray.get([r.__ray_call__.remote(lambda self: os.getpid()) for r in ranks])
            await _collect(supervisor, prompts[0][:4])  # first-step costs out of the timing below
            started = time.monotonic()
            results = await asyncio.gather(*(_collect(supervisor, p) for p in prompts))
            elapsed = time.monotonic() - started
            rss = [psutil.Process(pid).memory_info().rss for pid in pids]
            experts = [sorted(report["experts"]) for report in supervisor.gang.loads[:EXPERTS]]
            return nodes, results, elapsed, rss, experts
        finally:
            await supervisor.stop()

    nodes, results, elapsed, rss, experts = asyncio.run(main())
    assert results == expected
    assert len(nodes) == NODES  # SPREAD used every node
    assert [len(e) for e in experts] == [8] * EXPERTS and sorted(sum(experts, [])) == list(range(128))
    mib = [r / 2**20 for r in rss]
    print(f"\nfull depth, {ATTENTION} attention + {EXPERTS} expert ranks on {NODES} nodes: "
          f"{len(prompts)} streams x {NEW_TOKENS} tokens in {elapsed:.2f} s "
          f"(~{1000 * elapsed / NEW_TOKENS:.0f} ms per decode step, prefill included); RSS per attention "
          f"rank {min(mib[:ATTENTION]):.0f}-{max(mib[:ATTENTION]):.0f} MiB, per expert rank "
          f"{min(mib[ATTENTION:]):.0f}-{max(mib[ATTENTION:]):.0f} MiB, all ranks {sum(mib) / 1024:.1f} GiB")
