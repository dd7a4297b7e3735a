"""Streams and text: incremental detokenization, sync and async consumers of a stepping engine."""

import queue
import threading

import pytest

from model.tiny import make_tiny
from model.tokenizer import Tokenizer
from tests.workers.drive import run_all
from workers.config import EngineConfig
from workers.detokenizer import IncrementalDetokenizer
from workers.engine import LLMEngine
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("stream") / "tiny", "tiny-maverick", seed=2)


def test_detokenizer_deltas_join_to_the_full_decode(tiny):
    tok = Tokenizer(tiny)
    ids = tok.encode("naïve café ☕ — ünïcödé text, with 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 🚀🚀!", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([t]) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_are_skipped_in_text(tiny):
    tok = Tokenizer(tiny)
    detok = IncrementalDetokenizer(tok)
    eot = tok.token_to_id("<|eot|>")
    text = "".join(detok.add([t]) for t in tok.encode("hi there", add_special_tokens=False) + [eot])
    assert text == "hi there"


def test_engine_on_its_own_thread_streams_text_deltas(tiny):
    """As in an attention worker: requests are submitted from one thread while another steps the engine
    and hands each step's outputs over; the deltas join to the decoded text."""
    eng = LLMEngine.from_model_dir(tiny, EngineConfig())
    tok = eng.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompt = tok.encode("Once upon a time")
    handed: queue.Queue = queue.Queue()
    stop = threading.Event()

    def drive():  # the engine runs on its own thread, like an attention worker's wave thread
        while not stop.is_set():
            if eng.has_work():
                handed.put(eng.step())
            else:
                stop.wait(0.001)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    requests = [GenerateRequest(prompt, params) for _ in range(2)]
    outputs: dict[str, list] = {r.request_id: [] for r in requests}
    try:
        for r in requests:
            eng.submit(r)
        open_requests = len(requests)
        while open_requests:
            for out in handed.get(timeout=60):
                outputs[out.request_id].append(out)
                open_requests -= out.finished
    finally:
        stop.set()
        driver.join(5)
    for outs in outputs.values():
        ids = [t for o in outs for t in o.new_token_ids]
        assert len(ids) == 30 and outs[-1].finish_reason == "length"
        assert "".join(o.text_delta or "" for o in outs) == tok.decode(ids)
        assert outs[-1].usage.prompt_tokens == len(prompt) and outs[-1].usage.completion_tokens == 30
    first, second = outputs.values()
    assert [t for o in first for t in o.new_token_ids] == [t for o in second for t in o.new_token_ids]


def _run(eng, request):
    eng.submit(request)
    return run_all(eng)[request.request_id]


@pytest.fixture(scope="module")
def text_engine(tiny):
    return LLMEngine.from_model_dir(tiny, EngineConfig())


def test_stop_strings_cut_the_text_across_token_boundaries(text_engine):
    eng, tok = text_engine, text_engine.tokenizer
    prompt = tok.encode("The answer is")
    greedy = _run(eng, GenerateRequest(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)))
    ids = [t for o in greedy for t in o.new_token_ids]
    text = tok.decode(ids)
    # a stop string that starts inside one token and ends inside a later one
    pieces = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    cut = next(i for i in range(4, len(ids)) if len(pieces[i + 1]) - len(pieces[i]) >= 2)
    start = len(pieces[cut]) - 1
    stop = text[start:len(pieces[cut + 1]) + 1]
    assert stop not in text[:start]
    outs = _run(eng, GenerateRequest(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                            stop=[stop, "never appears"])))
    deltas = [o.text_delta or "" for o in outs]
    assert "".join(deltas) == text[:start]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    assert not any(stop[:2] in d for d in deltas)  # not even part of it leaked in a delta
    got = [t for o in outs for t in o.new_token_ids]
    k = len(got)  # generation stopped with the token that completed the stop string
    assert got == ids[:k] and stop in pieces[k] and stop not in pieces[k - 1]


def test_echo_puts_the_prompt_first(text_engine):
    eng, tok = text_engine, text_engine.tokenizer
    prompt = tok.encode("Echo me, please")
    outs = _run(eng, GenerateRequest(prompt, SamplingParams(temperature=0.0, max_tokens=5, echo=True, logprobs=1)))
    text = "".join(o.text_delta or "" for o in outs)
    assert text.startswith("Echo me, please")
    assert text == "Echo me, please" + tok.decode([t for o in outs for t in o.new_token_ids])
    assert outs[0].prompt_logprobs is not None and len(outs[0].prompt_logprobs) == len(prompt)
