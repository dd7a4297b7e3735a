"""Structured outputs in the engine: every choice follows its own grammar through preemption and
resumption, EOS only where the grammar may end, compiles never hold up other requests."""

import json
import re
import threading

import jsonschema
import pytest
import torch

from model.tiny import make_tiny
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import InvalidRequest
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams
from workers.structured import GrammarSpec

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "n": {"type": "integer", "minimum": -5, "maximum": 500},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}},
    "required": ["city", "n", "tags", "inner"], "additionalProperties": False}
SPEC = GrammarSpec.json_schema(SCHEMA)
PROMPT = [2016, 400, 401, 402, 7]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("structured") / "tiny", "tiny-maverick", seed=2)


def engine(ckpt, **kw):
    kw.setdefault("block_size", 8)
    return LLMEngine.from_model_dir(ckpt, EngineConfig(**kw))


def run(eng, requests) -> dict[tuple[str, int], list]:
    for r in requests:
        eng.submit(r)
    got: dict[tuple[str, int], list] = {}
    while eng.has_work():
        for out in eng.step():
            got.setdefault((out.request_id, out.index), []).append(out)
    return got


def text(outs) -> str:
    return "".join(o.text_delta or "" for o in outs)


def ids(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def structured_requests(tag: str) -> list[GenerateRequest]:
    return [GenerateRequest(PROMPT, SamplingParams(max_tokens=120, temperature=0.0, structured=SPEC), f"{tag}-g"),
            GenerateRequest(PROMPT, SamplingParams(max_tokens=120, temperature=1.0, seed=7, n=3, structured=SPEC),
                            f"{tag}-s"),
            GenerateRequest(PROMPT[:3], SamplingParams(max_tokens=120, temperature=0.8, top_p=0.9, seed=1,
                                                       presence_penalty=1.0, structured=SPEC), f"{tag}-p")]


def test_every_choice_follows_its_own_grammar_and_ends_where_it_may(ckpt):
    got = run(engine(ckpt), structured_requests("a"))
    assert len(got) == 5
    texts = set()
    for outs in got.values():
        assert outs[-1].finish_reason == "stop" and outs[-1].error is None
        jsonschema.validate(json.loads(text(outs)), SCHEMA)
        texts.add(text(outs))
    assert len(texts) >= 3  # the n=3 choices drew their own paths, each through its own matcher


def test_max_tokens_mid_object_ends_with_length(ckpt):
    got = run(engine(ckpt), [GenerateRequest(PROMPT, SamplingParams(max_tokens=4, temperature=0.0, structured=SPEC))])
    (outs,) = got.values()
    assert outs[-1].finish_reason == "length" and text(outs).startswith('{"city')


def test_preemption_keeps_each_requests_grammar_state(ckpt):
    roomy = run(engine(ckpt), structured_requests("b"))
    tight = engine(ckpt, kv_blocks={"full_attention": 24, "chunked_attention": 24}, max_num_batched_tokens=16)
    squeezed = run(tight, structured_requests("b"))
    assert tight.num_preemptions_total > 0
    # greedy and seeded draws do not depend on the batch: the same tokens, and all still valid
    assert {k: ids(v) for k, v in squeezed.items()} == {k: ids(v) for k, v in roomy.items()}


def test_a_prefetched_mask_is_the_one_filled_on_the_spot_and_a_stale_one_is_never_used(ckpt):
    grammars = engine(ckpt).grammars
    a, b = grammars.matchers(SPEC, [[], []]).result()
    logits = torch.zeros(2, grammars.vocab_size)
    grammars.prefetch([a])  # a's mask comes from the mask thread, b's is filled on the spot
    start = grammars.apply_masks(logits, [0, 1], [a, b]).isinf()
    assert torch.equal(start[0], start[1]) and 0 < int((~start[0]).sum()) < grammars.vocab_size
    grammars.prefetch([a, b])
    a.advance(int((~start[0]).nonzero()[0]))  # a moves on: its prefetched mask is of the old state
    moved = grammars.apply_masks(logits, [0, 1], [a, b]).isinf()
    assert torch.equal(moved[1], start[1]) and not torch.equal(moved[0], start[0])
    fresh, = grammars.matchers(SPEC, [[int((~start[0]).nonzero()[0])]]).result()
    assert torch.equal(grammars.apply_masks(logits[:1], [0], [fresh]).isinf()[0], moved[0])


@pytest.mark.parametrize("cut", [1, 6])
def test_resumed_choices_replay_through_a_fresh_matcher(ckpt, cut):
    first, second = engine(ckpt), engine(ckpt)
    whole = run(first, structured_requests("w"))
    resumed = []
    for r in structured_requests("r"):
        done = {c: ids(whole[(r.request_id.replace("r-", "w-"), c)][:cut]) for c in range(r.params.n)}
        r.resume = {c: t for c, t in done.items() if len(whole[(r.request_id.replace("r-", "w-"), c)]) > cut}
        resumed.append(r)
    rest = run(second, resumed)
    for (rid, c), outs in whole.items():
        again = whole[(rid, c)][:cut] + rest.get((rid.replace("w-", "r-"), c), [])
        assert ids(again) == ids(outs) and text(again) == text(outs)


def test_a_grammar_that_cannot_compile_ends_its_request_alone(ckpt):
    eng = engine(ckpt)
    bad = GenerateRequest(PROMPT, SamplingParams(max_tokens=4, structured=GrammarSpec("regex", "a(b", "x")), "bad")
    good = GenerateRequest(PROMPT, SamplingParams(max_tokens=4, temperature=0.0), "good")
    got = run(eng, [bad, good])
    assert isinstance(got[("bad", 0)][-1].error, InvalidRequest) and "regex" in str(got[("bad", 0)][-1].error)
    assert got[("good", 0)][-1].finish_reason == "length"


def test_a_schema_that_admits_nothing_says_so_in_one_line(ckpt):
    """A $ref cycle compiles in llguidance but no token can start it: the error names that, not the
    parser's state dump."""
    eng = engine(ckpt)
    cycle = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    bad = GenerateRequest(PROMPT, SamplingParams(max_tokens=4, structured=GrammarSpec(
        "json", json.dumps(cycle), "response_format")), "bad")
    error = str(run(eng, [bad])[("bad", 0)][-1].error)
    assert error == "response_format: the JSON schema admits no output at all (a $ref cycle that never reaches a value?)"


def test_a_compiling_grammar_holds_up_no_other_request(ckpt):
    eng = engine(ckpt)
    release = threading.Event()
    eng.grammars.check(GrammarSpec("regex", "x")).result()  # the grammar thread is up
    eng.grammars._thread.submit(release.wait)  # the next compile queues behind this
    woken = threading.Event()
    eng.on_work = woken.set
    waiting = GenerateRequest(PROMPT, SamplingParams(max_tokens=3, temperature=0.0, structured=SPEC), "waits")
    eng.submit(waiting)
    eng.submit(GenerateRequest(PROMPT, SamplingParams(max_tokens=5, temperature=0.0), "free"))
    got: dict = {}
    while not got.get(("free", 0), [None])[-1] or not got[("free", 0)][-1].finished:
        for out in eng.step():
            got.setdefault((out.request_id, out.index), []).append(out)
    assert ("waits", 0) not in got
    assert not woken.is_set() and eng.has_work()  # still compiling, and the driver is told so
    release.set()
    assert woken.wait(60)
    got = run(eng, [])
    assert got[("waits", 0)][-1].finish_reason == "length"


def test_structured_outputs_need_a_tokenizer(ckpt):
    eng = LLMEngine.from_model_dir(ckpt, EngineConfig(block_size=8), skip_tokenizer_init=True)
    with pytest.raises(InvalidRequest, match="tokenizer"):
        eng.submit(GenerateRequest(PROMPT, SamplingParams(max_tokens=4, structured=SPEC)))


@pytest.mark.parametrize("regex, ascii", [(r"\d{3}-\d{4}", "[0-9]{3}-[0-9]{4}"), (r"[\d.]+", "[0-9.]+"),
                                          (r"\D", "[^0-9]"), (r"\\d", r"\\d"), (r"[]\d]", "[]0-9]"),
                                          (r"[^]\d]x", "[^]0-9]x")])
def test_regex_digits_are_ascii_as_vllm_and_json_schema_read_them(regex, ascii):
    from workers.structured import ascii_digits

    assert ascii_digits(regex) == ascii


def test_a_regex_digit_is_never_another_scripts_digit(ckpt):
    spec = GrammarSpec("regex", r"\d{3}-\d{2}", "structured_outputs.regex")
    got = run(engine(ckpt), [GenerateRequest(PROMPT, SamplingParams(max_tokens=12, temperature=1.5, seed=4, n=16,
                                                                    structured=spec), "digits")])
    for outs in got.values():  # llguidance's own \d is Unicode: Arabic-Indic and NKo digits were drawn
        assert re.fullmatch(r"[0-9]{3}-[0-9]{2}", text(outs)), text(outs)
