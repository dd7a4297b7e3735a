"""The engine when the KV cache fills: every admitted request finishes, equal to transformers.

The checkpoint's chunk is 20 tokens (tests/workers/conftest.py), blocks are 8: a 140-token prompt
crosses seven chunks. Requests arrive a few per step, as they do from a server.
"""

import logging

import pytest
import torch

from tests.oracle import hf_greedy
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import ContextTooLong
from workers.llm import LLM
from workers.protocol import GenerateRequest
from workers.request import Request
from workers.sampling_params import SamplingParams

BLOCK = 8
OUTPUT = 40


def mixed_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 140, 12, 97, 40, 131, 5, 64]
    return [torch.randint(3, 128, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def pressured_engine(ckpt, budget: int) -> LLMEngine:
    # the longest request (140 + 40 tokens) needs 23 full blocks: 48 hold about two of them
    config = EngineConfig(block_size=BLOCK, kv_blocks={"full_attention": 48, "chunked_attention": 12},
                          max_num_batched_tokens=budget, max_num_seqs=16)
    return LLMEngine.from_model_dir(ckpt, config, skip_tokenizer_init=True)


@pytest.mark.parametrize("budget", [16, 1024])
def test_sixteen_requests_in_a_cache_for_two_all_equal_transformers(hf_checkpoint, budget):
    ckpt, hf = hf_checkpoint
    eng = pressured_engine(ckpt, budget)
    ps = mixed_prompts(16, seed=budget)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
    outputs = {}
    for i, p in enumerate(ps):  # two arrive per step
        eng.submit(GenerateRequest(p, params, request_id=f"r{i}"))
        if i % 2:
            for out in eng.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    steps, crowded = 0, 0
    while eng.has_work():
        for out in eng.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
        assert steps < 20_000, eng.kv.describe()
        # requests waited while the full group was nearly exhausted: the cache, not the batch, limited it
        crowded += bool(eng.scheduler.waiting) and eng.kv.pools["full_attention"].num_free < 23
    stats = eng.stats()
    assert crowded > 10 and stats.num_blocked_steps_total == 0
    if budget == 16:  # small chunks admit many prompts at once: decodes then outgrow the cache
        assert stats.num_preemptions_total > 0
    for i, p in enumerate(ps):
        assert outputs[f"r{i}"] == hf_greedy(hf, p, OUTPUT), f"request {i} ({len(p)} prompt tokens)"
    assert not eng.kv.seqs and all(n == 0 for n in eng.kv.stats().blocks_used.values())


def test_a_request_longer_than_the_cache_is_refused_naming_the_limit(hf_checkpoint):
    ckpt, _ = hf_checkpoint
    eng = pressured_engine(ckpt, 1024)
    assert eng.max_model_len == 48 * BLOCK
    with pytest.raises(ContextTooLong, match=r"maximum context length is 384 tokens \(set by the KV cache: 48 "
                                             r"full_attention blocks"):
        eng.submit(GenerateRequest([5] * 300, SamplingParams(max_tokens=100)))
    params = SamplingParams(temperature=0.0, max_tokens=84, ignore_eos=True)
    out = LLM(engine=eng).generate([[5] * 300], params)[0].outputs[0]
    assert len(out.token_ids) == 84  # exactly the limit still runs


def test_a_blocked_step_is_counted_logged_once_and_idles_until_an_abort(hf_checkpoint, caplog):
    ckpt, _ = hf_checkpoint
    eng = pressured_engine(ckpt, 1024)
    # validation refuses such a request; put one straight into the scheduler to reach the state
    # a wrong cache plan would cause
    doomed = Request("doomed", [5] * 500, SamplingParams(temperature=0.0), max_tokens=1)
    eng._live["doomed"] = [doomed]
    eng.outputs.track(doomed)
    eng.scheduler.add(doomed)
    with caplog.at_level(logging.ERROR, logger="workers.engine"):
        steps = 0
        while not eng.blocked:  # it prefills what fits, then cannot get one more block
            assert eng.step() == []
            steps += 1
            assert steps < 100
        for _ in range(5):
            assert eng.step() == []
    assert eng.blocked and not eng.has_work() and eng.pending_tokens() == 0
    assert eng.stats().num_blocked_steps_total == 6
    blocked_logs = [r for r in caplog.records if "engine blocked" in r.getMessage()]
    assert len(blocked_logs) == 1 and "full_attention" in blocked_logs[0].getMessage()
    eng.abort("doomed")
    assert eng.has_work()
    outs = eng.step()
    assert [o.finish_reason for o in outs] == ["abort"] and not eng.blocked and not eng.has_work()
