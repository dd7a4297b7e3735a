"""The OpenAI API over the package's deployment (1 attention + 2 expert workers), through the official client.

Greedy tokens must equal `transformers`; every sampling field must reach the engine (the served
result equals our offline engine given the same parameters, which the workers tests pin down).
"""

import asyncio
import json
import time
import urllib.request

import openai
import pytest
import torch

from tests.oracle import hf_greedy
from tests.router.conftest import deploy

pytestmark = pytest.mark.timeout(600)

PROMPT_IDS = [[2016, 11, 12, 13, 14], [2016] + list(range(300, 420, 3)), [2016, 7, 7, 7, 7, 7]]


@pytest.fixture(scope="module")
def hf(live):
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(live.model_dir, dtype=torch.float32,
                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tok(live):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(live.model_dir)


@pytest.fixture(scope="module")
def offline(live):
    from workers.llm import LLM

    return LLM(live.model_dir)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=120)


def greedy(**kw):
    return {"temperature": 0.0, **kw}


def eos_cut(tokens, eos=(2017, 2023, 2024)):
    return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]


def test_models_health_tokenize(live, client, hf_tok):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for path in ("/health", "/health/ready"):
        with urllib.request.urlopen(live.url + path) as r:
            assert r.status == 200
    text = "The quick brown fox"
    body = json.dumps({"prompt": text}).encode()
    req = urllib.request.Request(live.url + "/tokenize", body, {"content-type": "application/json"})
    tokens = json.loads(urllib.request.urlopen(req).read())["tokens"]
    assert tokens == hf_tok(text)["input_ids"]
    req = urllib.request.Request(live.url + "/detokenize", json.dumps({"tokens": tokens}).encode(),
                                 {"content-type": "application/json"})
    assert json.loads(urllib.request.urlopen(req).read())["prompt"] == hf_tok.decode(tokens)


def test_completion_token_ids_equal_transformers(client, hf):
    out = client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=16,
                                    extra_body={"return_token_ids": True}, **greedy())
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice, prompt in zip(out.choices, PROMPT_IDS):
        assert choice.model_extra["prompt_token_ids"] == prompt
        assert choice.model_extra["token_ids"] == eos_cut(hf_greedy(hf, prompt, 16))
    assert out.usage.prompt_tokens == sum(map(len, PROMPT_IDS))
    assert out.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in out.choices)


def test_text_completion_and_chat_equal_transformers(client, hf, hf_tok):
    text = "The quick brown fox"
    out = client.completions.create(model="tiny", prompt=text, max_tokens=12,
                                    extra_body={"return_token_ids": True}, **greedy())
    ids = hf_tok(text)["input_ids"]
    expected = eos_cut(hf_greedy(hf, ids, 12))
    assert out.choices[0].model_extra["token_ids"] == expected
    assert out.choices[0].text == hf_tok.decode(expected, skip_special_tokens=True)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                          extra_body={"return_token_ids": True}, **greedy())
    chat_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
    assert chat.model_extra["prompt_token_ids"] == chat_ids
    expected = eos_cut(hf_greedy(hf, chat_ids, 10))
    assert chat.choices[0].model_extra["token_ids"] == expected
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == len(expected)


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=20, **greedy())
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    messages = [{"role": "user", "content": "Tell me a story"}]
    full_chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, **greedy())
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, stream=True,
                                                 **greedy()))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full_chat.choices[0].message.content


def test_async_concurrent_requests_equal_transformers_alone(live, hf):
    prompts = [[2016] + list(range(50 + 7 * i, 50 + 7 * i + 5 + 11 * i)) for i in range(8)]

    async def main():
        client = openai.AsyncOpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=120)

        async def one(p):
            out = await client.completions.create(model="tiny", prompt=p, max_tokens=12,
                                                  extra_body={"return_token_ids": True}, **greedy())
            return out.choices[0].model_extra["token_ids"]

        async def streamed(p):
            ids = []
            async for chunk in await client.completions.create(model="tiny", prompt=p, max_tokens=12, stream=True,
                                                               extra_body={"return_token_ids": True}, **greedy()):
                ids += chunk.choices[0].model_extra["token_ids"]
            return ids

        return await asyncio.gather(*[(one if i % 2 else streamed)(p) for i, p in enumerate(prompts)])

    results = asyncio.run(main())
    for got, p in zip(results, prompts):
        assert got == eos_cut(hf_greedy(hf, p, 12))


# Each field changes what the engine does; the served tokens equal the offline engine's with it.
FIELD_CASES = [
    {"temperature": 0.9, "seed": 7},
    {"temperature": 1.0, "top_p": 0.5, "seed": 3},
    {"temperature": 1.0, "top_k": 5, "seed": 3},
    {"temperature": 1.0, "min_p": 0.2, "seed": 3},
    {"temperature": 0.0, "presence_penalty": 1.5},
    {"temperature": 0.0, "frequency_penalty": 1.5},
    {"temperature": 0.0, "repetition_penalty": 1.8},
    {"temperature": 0.0, "logit_bias": {"1234": 100}},
    {"temperature": 0.0, "stop_token_ids": [1853]},
    {"temperature": 0.0, "ignore_eos": True},
]


@pytest.mark.parametrize("fields", FIELD_CASES, ids=lambda f: ",".join(f))
def test_sampling_fields_reach_the_engine(client, offline, fields):
    from workers.sampling_params import SamplingParams

    prompt = [2016, 261, 75, 322, 885, 40, 41]
    # extra_body puts every field in the JSON body, as a non-Python client sends it
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                    extra_body={"return_token_ids": True, **fields})
    params = {**fields, "max_tokens": 24}
    if "logit_bias" in params:
        params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
    expected = offline.generate([prompt], SamplingParams(**params))[0].outputs[0]
    assert out.choices[0].model_extra["token_ids"] == expected.token_ids
    assert out.choices[0].finish_reason == expected.finish_reason
    if "logit_bias" in fields:
        assert set(expected.token_ids) == {1234}


def test_stop_strings_n_and_seed(client):
    base = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, **greedy())
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, stop=[stop], **greedy())
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["stop_reason"] == stop

    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=11, n=3)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # each choice draws its own tokens

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=8, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]


def test_logprobs_equal_log_softmax_of_transformers(client, hf):
    prompt = PROMPT_IDS[1]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=3, echo=True,
                                    extra_body={"return_token_ids": True}, **greedy())
    choice = out.choices[0]
    tokens = choice.model_extra["token_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    lps = choice.logprobs
    assert len(lps.token_logprobs) == len(prompt) + len(tokens) and lps.token_logprobs[0] is None
    seq = prompt + tokens
    for pos in range(1, len(seq)):
        assert lps.token_logprobs[pos] == pytest.approx(logp[pos - 1, seq[pos]].item(), abs=1e-4)
    for top in lps.top_logprobs[len(prompt):]:
        assert 3 <= len(top) <= 4
    assert choice.text.startswith(client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True,
                                                            **greedy()).choices[0].text[:5])

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2, **greedy())
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
               for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy took the best


def test_prompt_logprobs_per_choice_as_vllm_returns_them(client, hf):
    """`prompt_logprobs` (vLLM's field): per completion choice, beside chat's choices, in the first stream chunk;
    each prompt position after the first maps token ids to {logprob, rank, decoded_token}."""
    prompt = PROMPT_IDS[0]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)

    def check(lps):
        assert len(lps) == len(prompt) and lps[0] is None
        for pos in range(1, len(prompt)):
            entry = lps[pos][str(prompt[pos])]
            assert entry["logprob"] == pytest.approx(logp[pos - 1, prompt[pos]].item(), abs=1e-4)
            assert entry["rank"] >= 1 and isinstance(entry["decoded_token"], str)
            assert 1 <= len(lps[pos]) <= 3  # the token itself and the 2 best

    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, n=2, extra_body={"prompt_logprobs": 2},
                                    **greedy())
    for choice in out.choices:
        check(choice.model_extra["prompt_logprobs"])
    first = next(iter(client.completions.create(model="tiny", prompt=prompt, max_tokens=2, stream=True,
                                                extra_body={"prompt_logprobs": 2}, **greedy())))
    check(first.choices[0].model_extra["prompt_logprobs"])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          extra_body={"prompt_logprobs": 0}, **greedy())
    lps = chat.model_extra["prompt_logprobs"]
    assert lps[0] is None and len(lps) == chat.usage.prompt_tokens and all(len(e) == 1 for e in lps[1:])
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **greedy())
    assert "prompt_logprobs" not in plain.choices[0].model_extra


def test_client_disconnect_aborts_the_request_in_its_engine(live):
    from ray import serve

    gang = serve.get_deployment_handle("gangs", "maverick")
    client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=120)
    stream = client.completions.create(model="tiny", prompt=[2016, 5, 6, 7], max_tokens=3000, stream=True,
                                       extra_body={"ignore_eos": True}, temperature=0.0)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = gang.stats.remote().result()
        if stats["in_flight"] == 0 and all(r.get("running", 0) == 0 for r in stats["ranks"]):
            break
        time.sleep(0.1)
    assert stats["in_flight"] == 0, stats
    assert all(r.get("running", 0) == 0 for r in stats["ranks"]), stats


def test_skip_tokenizer_init_serves_token_ids_only(live, tmp_path_factory, hf):
    raw = deploy(tmp_path_factory.mktemp("raw"), name="raw", route_prefix="/raw", skip_tokenizer_init=True)
    client = openai.OpenAI(base_url=raw.v1, api_key="unused", max_retries=0, timeout=120)
    out = client.completions.create(model="tiny", prompt=PROMPT_IDS[0], max_tokens=8, logprobs=1,
                                    extra_body={"return_token_ids": True}, **greedy())
    tokens = out.choices[0].model_extra["token_ids"]
    assert tokens == eos_cut(hf_greedy(hf, PROMPT_IDS[0], 8))
    assert out.choices[0].text == "" and out.choices[0].logprobs.tokens[0] == f"token_id:{tokens[0]}"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for call in (lambda: client.completions.create(model="tiny", prompt="text", max_tokens=2),
                 lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}]),
                 lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                        tools=[tool]),
                 lambda: client.completions.create(model="tiny", prompt=PROMPT_IDS[0], max_tokens=2,
                                                   extra_body={"response_format": {"type": "json_object"}}),
                 lambda: client.completions.create(model="tiny", prompt=PROMPT_IDS[0], max_tokens=2,
                                                   extra_body={"structured_outputs": {"regex": "a+"}})):
        with pytest.raises(openai.BadRequestError, match="skip-tokenizer-init"):
            call()
    assert client.completions.create(model="tiny", prompt=PROMPT_IDS[0], max_tokens=2).choices  # still serving
    from ray import serve

    serve.delete("raw")


def test_cached_tokens_always_present_and_counted_once_per_prompt(client):
    prompt = [2016] + list(range(700, 780))  # 81 tokens: 5 full blocks of 16 can be cached
    kw = dict(model="tiny", prompt=prompt, max_tokens=2, temperature=0.0, n=3)
    cold = client.completions.create(**kw).usage
    # choices 1 and 2 read the prompt choice 0 computed: that is not the client's cache hit
    assert cold.prompt_tokens_details.cached_tokens == 0 and cold.prompt_tokens == 81
    warm = client.completions.create(**kw).usage
    assert warm.prompt_tokens_details.cached_tokens == 80
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                                 max_tokens=2, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details is not None and 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens


def test_the_front_is_haproxy_not_the_python_proxy(live):
    """`maverick serve`'s default front (and this suite's): HAProxy holds the HTTP and gRPC ports and
    forwards to the ingress replica's own ports; Serve's Python proxy is not in the data path."""
    import psutil

    ports = {int(live.url.rsplit(":", 1)[1]), int(live.grpc_target.rsplit(":", 1)[1])}
    owners = {port: {psutil.Process(c.pid).name() for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid} for port in ports}
    assert all(names == {"haproxy"} for names in owners.values()), owners


def test_serve_on_a_cluster_whose_serve_has_other_ports_fails_clearly(live):
    """Serve keeps the ports it started with and only warns about new ones: `maverick serve --address`
    with another --http-port would wait forever on a port nobody serves. It exits 2 and says so."""
    import subprocess
    import sys
    from pathlib import Path

    import ray

    from tests.router.conftest import free_port

    running = int(live.url.rsplit(":", 1)[1])
    proc = subprocess.run([str(Path(sys.executable).with_name("maverick")), "serve", "--model", str(live.model_dir),
                           "--address", ray.get_runtime_context().gcs_address, "--http-port", str(free_port())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"Serve already runs on this cluster with HTTP port {running}; pass --http-port {running}" in proc.stderr
    assert urllib.request.urlopen(live.url + "/health/ready", timeout=30).status == 200  # the running app is untouched
