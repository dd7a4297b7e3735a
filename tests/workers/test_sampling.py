"""Every sampling parameter, each with a test that fails if the parameter were ignored."""

import json
import shutil

import pytest
import torch

from tests.oracle import hf_logits
from tests.workers.drive import run_all
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import InvalidRequest
from workers.llm import LLM
from workers.protocol import GenerateRequest
from workers.request import Request
from workers.sampler import draw, process_logits, sample, top_k_top_p
from workers.sampling_params import SamplingParams

V = 12


def rows(n, **params):
    sp = SamplingParams(**params).resolve({})
    return [Request(f"r{i}", [1, 2, 2, 3], sp, max_tokens=10) for i in range(n)]


def empirical(logits, reqs_factory, draws=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    reqs = reqs_factory(draws)
    tokens, _ = sample(logits.expand(draws, V).clone(), reqs, gen)
    counts += torch.bincount(torch.tensor(tokens), minlength=V)
    return counts / draws


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0, 0.2, -2.0, 1.2, 0.9])


def test_temperature_shapes_the_distribution():
    for t in (0.5, 1.0, 2.0):
        freq = empirical(LOGITS, lambda n: rows(n, temperature=t))
        assert (freq - torch.softmax(LOGITS / t, -1)).abs().max() < 0.035
    greedy, _ = sample(LOGITS.expand(5, V).clone(), rows(5, temperature=0.0))
    assert greedy == [7] * 5


def test_top_k_keeps_only_the_k_best():
    freq = empirical(LOGITS, lambda n: rows(n, temperature=1.0, top_k=3))
    assert set(torch.nonzero(freq).flatten().tolist()) == {7, 0, 1}
    expected = torch.zeros(V)
    expected[[7, 0, 1]] = torch.softmax(LOGITS[[7, 0, 1]], -1)
    assert (freq - expected).abs().max() < 0.035


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.softmax(LOGITS, -1)  # sorted: 7 (.41), 0 (.15), 1 (.09), ...
    p = float(probs[7] + probs[0]) - 0.01  # tokens 7 and 0 are needed to reach p
    freq = empirical(LOGITS, lambda n: rows(n, temperature=1.0, top_p=p))
    assert set(torch.nonzero(freq).flatten().tolist()) == {7, 0}


def test_min_p_drops_unlikely_tokens():
    probs = torch.softmax(LOGITS, -1)
    min_p = 0.3  # keep tokens with p >= 0.3 * p_max
    freq = empirical(LOGITS, lambda n: rows(n, temperature=1.0, min_p=min_p))
    assert set(torch.nonzero(freq).flatten().tolist()) == set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())


def reference_top_k_top_p(logits_V: torch.Tensor, k: int, p: float) -> set[int]:
    """The definition, one row, ranking the whole vocabulary: the tokens kept."""
    order = logits_V.argsort(descending=True)[: k or logits_V.numel()]
    probs = logits_V[order].softmax(-1)
    before = probs.cumsum(-1) - probs
    return {int(t) for t, b in zip(order, before) if b < p} | {int(order[0])}


@pytest.mark.parametrize("vocab", [50, 4000])
def test_top_k_top_p_keeps_what_ranking_the_whole_vocabulary_keeps(vocab):
    """Peaked rows settle among the first candidates, flat rows and wide top-k rank every token."""
    gen = torch.Generator().manual_seed(vocab)
    peaked = torch.randn(6, vocab, generator=gen) * 8
    flat = torch.randn(6, vocab, generator=gen) * 0.1
    logits = torch.cat([peaked, flat])
    settings = [(0, 0.9), (5, 1.0), (0, 0.5), (100, 0.95), (vocab, 0.99), (3, 0.2)] * 2
    out = top_k_top_p(logits, [k for k, _ in settings], [p for _, p in settings])
    for row, (k, p) in enumerate(settings):
        kept = set(torch.nonzero(out[row] > float("-inf")).flatten().tolist())
        assert kept == reference_top_k_top_p(logits[row], k, p), (row, k, p)
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])


def test_top_p_cut_keeps_ties_with_the_last_kept_token():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0]])  # probabilities .708, .096 x 3, .005
    # p = .75: the best token and one of the three 1.0s reach it; the cut is a threshold, so all three stay
    out = top_k_top_p(logits, [0], [0.75])
    assert torch.nonzero(out[0] > float("-inf")).flatten().tolist() == [0, 1, 2, 3]


def test_draw_inverts_the_cumulative_distribution():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 5)
    u = torch.tensor([0.0, 0.5, 0.74, 0.76, 1 - 2**-52], dtype=torch.float64)
    # target (1 - u) x total: 1 -> token 3, .5 -> 3, .26 -> 3, .24 -> 1, ~0 -> 1; zeros are never taken
    assert draw(probs, u).tolist() == [3, 3, 3, 1, 1]


def test_penalties_follow_their_formulas():
    logits = LOGITS.expand(4, V).clone()
    reqs = rows(4)
    reqs[0].output_token_ids = [7, 7, 0]
    reqs[1].params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25).resolve({})
    reqs[1].output_token_ids = [7, 7, 0]
    reqs[2].params = SamplingParams(repetition_penalty=1.5).resolve({})
    reqs[2].output_token_ids = [6, 0]
    reqs[3].params = SamplingParams(logit_bias={4: 10.0, 7: -100.0}).resolve({})
    out = process_logits(logits, reqs)
    assert torch.equal(out[0], LOGITS)  # no penalty asked, none applied
    expected = LOGITS.clone()
    expected[7] -= 2 * 0.5 + 0.25
    expected[0] -= 1 * 0.5 + 0.25
    assert torch.allclose(out[1], expected)
    seen = {1, 2, 3, 6, 0}  # prompt [1, 2, 2, 3] plus outputs
    rep = torch.tensor([(x / 1.5 if x > 0 else x * 1.5) if i in seen else x for i, x in enumerate(LOGITS.tolist())])
    assert torch.allclose(out[2], rep)
    assert out[3][4] == LOGITS[4] + 10 and out[3][7] == LOGITS[7] - 100
    assert torch.equal(logits, LOGITS.expand(4, V))  # the model's logits are not modified


def test_seeded_rows_ignore_their_neighbours():
    mixed = rows(3, temperature=1.0)
    seeded = rows(1, temperature=1.0, seed=42)[0]
    seeded.generator = torch.Generator().manual_seed(42)
    alone, _ = sample(LOGITS.expand(1, V).clone(), [seeded])
    seeded.generator = torch.Generator().manual_seed(42)
    together, _ = sample(LOGITS.expand(4, V).clone(), mixed[:2] + [seeded] + mixed[2:])
    assert together[2] == alone[0]


# -- through the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eng(hf_checkpoint):
    ckpt, _ = hf_checkpoint
    return LLMEngine.from_model_dir(ckpt, EngineConfig(block_size=8), skip_tokenizer_init=True)


PROMPT = [5, 17, 33, 2, 90, 44, 61, 7, 8, 100, 3]


def gen(eng, params, prompt=PROMPT):
    return LLM(engine=eng).generate([prompt], params)[0].outputs[0].token_ids


def test_seed_reproducible_whatever_the_batch(eng):
    params = SamplingParams(temperature=1.0, max_tokens=20, seed=1234, ignore_eos=True)
    alone = gen(eng, params)
    noise = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 5
    outs = LLM(engine=eng).generate([[9, 9, 9], PROMPT, [4] * 30, [7, 1], PROMPT, PROMPT],
                                    noise[:1] + [params] + noise[1:3] + [params] + noise[3:4])
    assert outs[1].outputs[0].token_ids == alone and outs[4].outputs[0].token_ids == alone
    other = gen(eng, SamplingParams(temperature=1.0, max_tokens=20, seed=99, ignore_eos=True))
    assert other != alone


def test_unseeded_sampling_varies_and_greedy_does_not(eng):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    assert len({tuple(gen(eng, params)) for _ in range(4)}) > 1
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert len({tuple(gen(eng, greedy)) for _ in range(3)}) == 1


def test_logit_bias_and_penalties_change_generation(eng):
    base = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    greedy = gen(eng, SamplingParams(**base))
    assert gen(eng, SamplingParams(**base, logit_bias={42: 100.0})) == [42] * 16
    assert gen(eng, SamplingParams(**base, logit_bias={greedy[0]: -100.0}))[0] != greedy[0]
    assert len(set(greedy)) < 16  # greedy repeats itself; a frequency penalty stops that
    no_repeat = gen(eng, SamplingParams(**base, frequency_penalty=2.0, presence_penalty=2.0))
    assert no_repeat != greedy and len(set(no_repeat)) > len(set(greedy))
    assert gen(eng, SamplingParams(**base, repetition_penalty=1.9)) != greedy


def test_n_choices_share_the_prompt_and_match_separate_requests(eng):
    prompt = list(range(3, 60))
    before = eng.kv.stats().prefix_hits_tokens
    request = GenerateRequest(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    eng.submit(request)
    outs = run_all(eng)[request.request_id]
    by_index = {i: [t for o in outs if o.index == i for t in o.new_token_ids] for i in range(3)}
    assert all(len(v) == 10 for v in by_index.values()) and len({tuple(v) for v in by_index.values()}) == 3
    assert eng.kv.stats().prefix_hits_tokens - before >= 2 * 48  # choices 1, 2 reuse the prompt's blocks
    for i in range(3):
        alone = gen(eng, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=10, ignore_eos=True), prompt)
        assert alone == by_index[i]


def test_llm_generate_returns_one_result_per_prompt_and_one_output_per_choice(eng):
    """As vLLM's `LLM.generate`: `outputs[i]` is choice i, each with its own tokens and finish (the
    offline LLM once joined the choices into one and stopped at the first that finished)."""
    base = dict(temperature=1.0, max_tokens=10, ignore_eos=True)
    alone = [gen(eng, SamplingParams(seed=7 + i, **base)) for i in range(3)]  # choice i draws as seed 7 + i
    # a stop token that ends choice 1 early and never appears in choice 0: the choices finish apart
    stop = next(t for t in alone[1][:8] if t not in alone[0])
    params = SamplingParams(n=3, seed=7, stop_token_ids=[stop], logprobs=0, **base)
    results = LLM(engine=eng).generate([PROMPT, PROMPT[:5]], params)
    assert [r.prompt_token_ids for r in results] == [PROMPT, PROMPT[:5]]
    first = results[0]
    assert [o.index for o in first.outputs] == [0, 1, 2] and first.finished
    for choice, tokens in zip(first.outputs, alone):
        cut = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert choice.token_ids == tokens[:cut]
        assert (choice.finish_reason, choice.stop_reason) == (("stop", stop) if stop in tokens else ("length", None))
        assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
        assert choice.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in choice.logprobs))
    assert first.outputs[0].finish_reason == "length" and first.outputs[1].finish_reason == "stop"
    assert [len(r.outputs) for r in results] == [3, 3] and all(r.finished for r in results)


def test_logprobs_are_log_softmax_of_the_model_logits(hf_checkpoint, eng):
    _, hf = hf_checkpoint
    request = GenerateRequest(PROMPT, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3,
                                                     prompt_logprobs=2))
    eng.submit(request)
    outs = run_all(eng)[request.request_id]
    tokens = [t for o in outs for t in o.new_token_ids]
    ref = torch.log_softmax(hf_logits(hf, PROMPT + tokens), -1)
    got = [lp for o in outs for lp in o.logprobs]
    for i, lp in enumerate(got):
        row = ref[len(PROMPT) - 1 + i]
        assert lp.token_id == tokens[i] and abs(lp.logprob - row[tokens[i]].item()) < 1e-4
        assert lp.rank == 1  # greedy picks the most likely
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
    prompt_lp = outs[0].prompt_logprobs
    assert prompt_lp[0] is None and len(prompt_lp) == len(PROMPT)
    for pos in range(1, len(PROMPT)):
        assert abs(prompt_lp[pos].logprob - ref[pos - 1][PROMPT[pos]].item()) < 1e-4
        assert prompt_lp[pos].rank == int((ref[pos - 1] > ref[pos - 1][PROMPT[pos]]).sum()) + 1


def test_checkpoint_generation_defaults_apply_when_fields_are_left_out(hf_checkpoint, tmp_path):
    ckpt, _ = hf_checkpoint
    local = tmp_path / "ckpt"
    shutil.copytree(ckpt, local)
    (local / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 1.0, "top_k": 1}))
    eng = LLMEngine.from_model_dir(local, EngineConfig(block_size=8), skip_tokenizer_init=True)
    left_out = gen(eng, SamplingParams(max_tokens=12, ignore_eos=True))  # top_k=1 from the checkpoint
    assert left_out == gen(eng, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    override = {tuple(gen(eng, SamplingParams(top_k=0, max_tokens=12, ignore_eos=True))) for _ in range(4)}
    assert len(override) > 1  # the request's own value wins


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1000), ("temperature", -0.1), ("temperature", "hot"), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 10**6), ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0.0), ("logprobs", 21), ("prompt_logprobs", -1), ("logit_bias", {999: 1.0}),
    ("logit_bias", {5: 200.0}), ("stop", [""]), ("stop", "x"), ("stop_token_ids", [-1]), ("max_tokens", 0),
    ("seed", 1.5),
])
def test_out_of_range_values_are_rejected_before_queueing(eng, field, value):
    with pytest.raises(InvalidRequest) as info:
        eng.submit(GenerateRequest(PROMPT, SamplingParams(**{field: value})))
    assert info.value.param == field
    assert not eng.has_work()


def test_stop_strings_need_a_tokenizer(eng):
    with pytest.raises(InvalidRequest, match="tokenizer"):
        eng.submit(GenerateRequest(PROMPT, SamplingParams(stop=["x"])))
