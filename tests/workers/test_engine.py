"""The engine against transformers: alone, in a busy batch, with prefix hits, preemption and chunks."""


import pytest
import torch

from tests.oracle import hf_greedy
from tests.workers.conftest import CHUNK
from tests.workers.drive import collect, run_all, token_ids
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import ContextTooLong, InvalidRequest
from workers.llm import LLM
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def engine(ckpt, **kw) -> LLMEngine:
    kw.setdefault("block_size", 8)
    return LLMEngine.from_model_dir(ckpt, EngineConfig(**kw), skip_tokenizer_init=True)


def prompts(n, lo=3, hi=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run_to_end(eng, requests, outputs=None):
    outputs = run_all(eng, outputs)
    return [token_ids(outputs[r.request_id]) for r in requests]


def assert_all_blocks_free(eng):
    assert all(n == 0 for n in eng.kv.stats().blocks_used.values()), eng.kv.stats()
    assert not eng.kv.seqs


def test_alone_equals_transformers(hf_checkpoint):
    ckpt, hf = hf_checkpoint
    eng = engine(ckpt)
    for p in prompts(3):
        out = LLM(engine=eng).generate([p], GREEDY)[0].outputs[0]
        assert out.token_ids == hf_greedy(hf, p, 24)
        assert out.finish_reason == "length"
    assert_all_blocks_free(eng)


def test_batch_of_32_mixed_equals_each_alone(hf_checkpoint):
    """Requests join while others are mid-prefill or decoding; prefills are split across steps."""
    ckpt, hf = hf_checkpoint
    ps = prompts(32, seed=1)
    eng = engine(ckpt, max_num_batched_tokens=48, max_num_seqs=32)
    requests = [GenerateRequest(p, GREEDY) for p in ps]
    for r in requests[:12]:
        eng.submit(r)
    mixed_steps, outputs = 0, {}
    for i in range(12, 32):  # the rest arrive one per step
        collect(eng.step(), outputs)
        sched = eng.scheduler
        mixed_steps += any(r.state.value == "decode" for r in sched.running) and any(
            r.state.value == "prefill" for r in sched.running)
        eng.submit(requests[i])
    outs = run_to_end(eng, requests, outputs)
    assert mixed_steps > 5  # the batches really mixed prefills with decodes
    alone = engine(ckpt)
    for p, out in zip(ps, outs):
        expected = LLM(engine=alone).generate([p], GREEDY)[0].outputs[0].token_ids
        assert out == expected
    for p, out in list(zip(ps, outs))[::4]:  # and the reference itself, on a sample
        assert out == hf_greedy(hf, p, 24)
    assert_all_blocks_free(eng)


def test_two_microbatches_equal_one_and_transformers(hf_checkpoint):
    """Ping-pong micro-batches (every MoE layer's begin/end interleaved between the two halves of a
    step, prefills and decodes mixed): the tokens of one batch, and the reference's."""
    ckpt, hf = hf_checkpoint
    ps = prompts(10, seed=6)
    split = engine(ckpt, microbatches=2, microbatch_min_tokens=2, max_num_batched_tokens=64)
    outs = LLM(engine=split).generate(ps, GREEDY)
    assert split.snapshot.microbatched_steps_total > 20  # prefill chunks and decode steps alike were split
    one = engine(ckpt, max_num_batched_tokens=64)
    whole = LLM(engine=one).generate(ps, GREEDY)
    assert one.snapshot.microbatched_steps_total == 0 and one.snapshot.num_steps > 20
    assert [o.outputs[0].token_ids for o in outs] == [w.outputs[0].token_ids for w in whole]
    for p, out in list(zip(ps, outs))[::3]:
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 24)
    assert_all_blocks_free(split)


def test_prefix_cache_hit_skips_prefill_and_changes_nothing(hf_checkpoint):
    ckpt, _ = hf_checkpoint
    shared = prompts(1, 70, 71, seed=2)[0]
    tails = [[5, 6, 7], [9] * 11, [40, 41]]
    eng = engine(ckpt)
    LLM(engine=eng).generate([shared + [1]], GREEDY)  # warms the cache
    before = eng.kv.stats().prefix_hits_tokens
    cached = LLM(engine=eng).generate([shared + t for t in tails], GREEDY)
    hits = eng.kv.stats().prefix_hits_tokens - before
    assert hits >= 3 * (len(shared) // 8 * 8 - 8)  # most of the shared prefix, for each request
    plain = engine(ckpt, enable_prefix_caching=False)
    expected = LLM(engine=plain).generate([shared + t for t in tails], GREEDY)
    assert [c.outputs[0].token_ids for c in cached] == [e.outputs[0].token_ids for e in expected]
    assert plain.kv.stats().prefix_hits_tokens == 0
    assert_all_blocks_free(eng)


def test_prefix_hit_needs_only_the_current_chunk_in_chunked_layers(hf_checkpoint):
    """Chunked-layer blocks before the chunk of the first uncomputed token are not needed for a hit."""
    ckpt, _ = hf_checkpoint
    long = prompts(1, 95, 96, seed=3)[0]
    # a chunked pool so small that the first request's early chunked blocks are reused (evicted)
    eng = engine(ckpt, kv_blocks={"full_attention": 100, "chunked_attention": 8}, max_num_batched_tokens=16)
    LLM(engine=eng).generate([long], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    seq_hashes = [h for h in eng.kv.pools["full_attention"].cached]
    chunked_cached = eng.kv.pools["chunked_attention"].cached
    assert any(h not in chunked_cached for h in seq_hashes[:8])  # early chunked blocks are gone
    out = LLM(engine=eng).generate([long + [3]], GREEDY)[0].outputs[0]
    # The full group holds all 11 blocks, but the chunked block of positions 80..87 was reused.
    # A query at the chunk boundary 80 reads no earlier chunked keys, so 80 tokens still hit
    # (a rule demanding every block of both groups would give 0 here).
    assert eng.kv.stats().prefix_hits_tokens == 80
    plain = engine(ckpt, enable_prefix_caching=False)
    assert out.token_ids == LLM(engine=plain).generate([long + [3]], GREEDY)[0].outputs[0].token_ids


def test_preemption_and_resume_give_the_same_tokens(hf_checkpoint):
    ckpt, _ = hf_checkpoint
    ps = prompts(10, 20, 60, seed=4)
    long_gen = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    # room for about three sequences at once in the full-attention group (up to 13 blocks each)
    eng = engine(ckpt, kv_blocks={"full_attention": 40, "chunked_attention": 60}, max_num_seqs=10,
                 enable_prefix_caching=False)
    outs = LLM(engine=eng).generate(ps, long_gen)
    assert eng.stats().num_preemptions_total > 0
    expected = LLM(engine=engine(ckpt)).generate(ps, long_gen)
    assert [o.outputs[0].token_ids for o in outs] == [e.outputs[0].token_ids for e in expected]
    assert_all_blocks_free(eng)


def test_chunk_boundary_crossings_with_unaligned_chunk(hf_checkpoint):
    """Prompt + output span more than 3 chunks; the chunk size (20) is no multiple of the block size."""
    ckpt, hf = hf_checkpoint
    p = prompts(1, 15, 16, seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=3 * CHUNK + 10, ignore_eos=True)
    for block_size in (8, 16, 6):
        eng = engine(ckpt, block_size=block_size, max_num_batched_tokens=7)
        out = LLM(engine=eng).generate([p], params)[0].outputs[0].token_ids
        assert out == hf_greedy(hf, p, params.max_tokens)
        assert_all_blocks_free(eng)


def test_chunked_group_memory_stays_bounded(hf_checkpoint):
    ckpt, _ = hf_checkpoint
    eng = engine(ckpt, block_size=8)
    request = GenerateRequest([5] * 10, SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True))
    eng.submit(request)
    peak_chunked, full_at, outputs = 0, [], {}
    while eng.has_work():
        collect(eng.step(), outputs)
        used = eng.kv.stats().blocks_used
        peak_chunked = max(peak_chunked, used["chunked_attention"])
        full_at.append(used["full_attention"])
    assert len(token_ids(outputs[request.request_id])) == 300
    assert peak_chunked <= CHUNK // 8 + 2  # one window, a straddling block, the step's new one
    assert max(full_at) == (10 + 300 - 1) // 8 + 1  # the full group keeps every block
    # and the switch turns freeing off: the chunked group then grows like the full one
    eng2 = engine(ckpt, block_size=8, free_chunked_blocks=False)
    eng2.submit(GenerateRequest([5] * 10, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)))
    peak = 0
    while eng2.has_work():
        eng2.step()
        peak = max(peak, eng2.kv.stats().blocks_used["chunked_attention"])
    assert peak == (10 + 100 - 1) // 8 + 1


def test_abort_frees_blocks_and_ends_the_stream(hf_checkpoint):
    ckpt, _ = hf_checkpoint
    eng = engine(ckpt)
    keep = GenerateRequest(prompts(1, seed=6)[0], GREEDY)
    gone = GenerateRequest(prompts(1, 60, 61, seed=7)[0], SamplingParams(temperature=0.0, max_tokens=500,
                                                                         ignore_eos=True))
    eng.submit(keep)
    eng.submit(gone)
    outputs = {}
    for _ in range(5):
        collect(eng.step(), outputs)
    assert eng.kv.stats().blocks_used["full_attention"] > 0
    eng.abort(gone.request_id)
    collect(eng.step(), outputs)
    outs = outputs[gone.request_id]
    assert outs[-1].finish_reason == "abort" and outs[-1].usage.completion_tokens == 5
    assert sum(len(o.new_token_ids) for o in outs) == 5  # one token per step, the prefill step's included
    assert gone.request_id not in eng.kv.seqs
    run_to_end(eng, [keep], outputs)
    assert_all_blocks_free(eng)


def test_zero_token_step_is_harmless(hf_checkpoint):
    ckpt, _ = hf_checkpoint
    eng = engine(ckpt)
    assert eng.step() == [] and not eng.has_work()
    for _ in range(1000):
        eng.step()
    assert eng.stats().num_steps == 0  # no forward ran (its cost is a benchmark's business)
    out = LLM(engine=eng).generate([[4, 5, 6]], GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 24


def test_eos_and_stop_token_ids(hf_checkpoint):
    ckpt, hf = hf_checkpoint
    p = prompts(1, seed=8)[0]
    ref = hf_greedy(hf, p, 24)
    eng = engine(ckpt)
    stop_at = ref[6]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_at])
    out = LLM(engine=eng).generate([p], params)[0].outputs[0]
    assert out.token_ids == ref[:ref.index(stop_at) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    eng.outputs.eos_ids = frozenset({stop_at})  # the checkpoint's EOS, unless ignore_eos
    out = LLM(engine=eng).generate([p], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    assert out.token_ids == ref[:ref.index(stop_at) + 1] and out.stop_reason is None
    out = LLM(engine=eng).generate([p], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == ref


def test_invalid_requests_raise_before_queueing(hf_checkpoint):
    ckpt, _ = hf_checkpoint
    eng = engine(ckpt, max_model_len=64)
    cases = [([], SamplingParams(), InvalidRequest), ([1, 128], SamplingParams(), InvalidRequest),
             ([1, -1], SamplingParams(), InvalidRequest), ([1] * 60, SamplingParams(temperature=0.0, max_tokens=5), ContextTooLong),
             ([1] * 64, SamplingParams(), ContextTooLong), ([1], SamplingParams(temperature=0.0, max_tokens=0), InvalidRequest),
             ([1], SamplingParams(stop_token_ids=[999]), InvalidRequest),
             # an overlong prompt is refused by its length before its ids are read (the costly check)
             ([1] * 70 + [-1], SamplingParams(), ContextTooLong)]
    for ids, params, error in cases:
        with pytest.raises(error):
            eng.submit(GenerateRequest(ids, params))
    assert not eng.has_work()
    eng.submit(GenerateRequest([1, 2], SamplingParams(temperature=0.0, max_tokens=3), request_id="dup"))
    with pytest.raises(InvalidRequest, match="already in use"):
        eng.submit(GenerateRequest([1, 2], SamplingParams(temperature=0.0, max_tokens=3), request_id="dup"))
    with pytest.raises(ContextTooLong, match="maximum context length is 64"):
        eng.submit(GenerateRequest([1] * 60, SamplingParams(temperature=0.0, max_tokens=5)))
