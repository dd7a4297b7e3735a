"""A KV cache that holds about two requests, served over HTTP: 16 concurrent requests all finish,
each equal to transformers, alone (A=1) and in a gang (A=1, E=2); a request longer than the cache gets
a 400 at once and the server goes on.

The checkpoint is the reported one: 6 layers (4 chunked with chunk 12, 2 full), 3 KV heads of 16
dims, fp32, `kv_cache_memory` 600000 bytes (12 chunked + 24 full blocks of 16 tokens, so one
sequence holds at most 384 tokens); prompts of 3-140 tokens, 40 greedy tokens each.
"""

import asyncio

import openai
import pytest
import torch

from tests.oracle import MAVERICK_LIKE, hf_greedy, hf_model, hf_text_config, save_conditional
from tests.router.conftest import deploy

pytestmark = pytest.mark.timeout(900)

OUTPUT = 40
LENGTHS = [3, 140, 12, 97, 40, 131, 5, 64, 120, 27, 88, 9, 140, 52, 110, 33]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = hf_text_config(MAVERICK_LIKE, num_hidden_layers=6, no_rope_layer_interval=3, attention_chunk_size=12,
                            num_attention_heads=6, num_key_value_heads=3, head_dim=16, max_position_embeddings=1024)
    hf = hf_model(config, seed=5)
    return save_conditional(hf, tmp_path_factory.mktemp("pressure") / "ckpt"), hf


@pytest.fixture(scope="module")
def servers(local_ray, checkpoint):
    ckpt, _ = checkpoint
    common = dict(model=str(ckpt), make_tiny=None, skip_tokenizer_init=True)
    alone = deploy(ckpt.parent, name="alone", route_prefix="/alone", **common,
                   engine={"kv_cache_memory": 600_000, "max_num_batched_tokens": 16})
    gang = deploy(ckpt.parent, name="gang", route_prefix="/gang", expert_workers=2, **common,
                  engine={"kv_cache_memory": 600_000})
    yield {"alone": alone, "gang": gang}


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in LENGTHS]


async def complete_all(live, batch):
    client = openai.AsyncOpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=600)

    async def one(i, p):
        kw = dict(model="tiny", prompt=p, max_tokens=OUTPUT, temperature=0.0,
                  extra_body={"return_token_ids": True, "ignore_eos": True})
        if i % 2:
            out = await client.completions.create(**kw)
            return out.choices[0].model_extra["token_ids"]
        ids = []
        async for chunk in await client.completions.create(stream=True, **kw):
            ids += chunk.choices[0].model_extra["token_ids"] if chunk.choices else []
        return ids

    try:
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(batch)])
    finally:
        await client.close()


def gang_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("gangs", app).stats.remote().result()


@pytest.mark.parametrize("layout", ["alone", "gang"])
def test_sixteen_concurrent_requests_in_a_cache_for_two_equal_transformers(servers, checkpoint, layout):
    _, hf = checkpoint
    batch = prompts()
    results = asyncio.run(complete_all(servers[layout], batch))
    for i, (got, p) in enumerate(zip(results, batch)):
        assert got == hf_greedy(hf, p, OUTPUT), f"request {i} ({len(p)} prompt tokens)"
    ranks = [r for r in gang_stats(layout)["ranks"] if "kv" in r]
    assert sum(r["blocked_steps"] for r in ranks) == 0
    if layout == "alone":  # 16-token steps admit many prompts at once: their decodes outgrow the cache
        assert sum(r["preemptions"] for r in ranks) > 0
    assert all(r["running"] == 0 and r["waiting"] == 0 for r in ranks)
    assert all(sum(r["kv"]["blocks_used"].values()) == 0 for r in ranks)  # nothing leaked


def test_a_request_too_long_for_the_cache_gets_400_and_serving_goes_on(servers, checkpoint):
    _, hf = checkpoint
    live = servers["alone"]
    client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[5] * 300, max_tokens=100, temperature=0.0)
    body = err.value.body
    assert body["param"] == "max_tokens" and "384" in body["message"] and "KV cache" in body["message"], body
    p = prompts()[1]
    out = client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0.0,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
    assert out.choices[0].model_extra["token_ids"] == hf_greedy(hf, p, 8)
