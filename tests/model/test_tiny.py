"""`make-tiny` checkpoints: transformers loads them, our model matches it, the tokenizer and chat
template behave exactly as transformers' do."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from model.config import Llama4Config
from model.generate import greedy_generate
from model.loader import load_pretrained
from model.tiny import TINY_PRESETS, make_tiny, text_weight_shapes
from model.tokenizer import Tokenizer, load_generation_defaults
from tests.oracle import hf_greedy, hf_logits


@pytest.fixture(scope="module", params=["tiny-maverick", "tiny-scout"])
def tiny(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(request.param) / "ckpt", request.param, seed=1)


@pytest.fixture(scope="module")
def hf_pair(tiny):
    from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration

    _, info = Llama4ForConditionalGeneration.from_pretrained(
        tiny, dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf = Llama4ForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="eager").eval()
    return hf, load_pretrained(tiny)


def test_layout_is_the_hub_layout(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForConditionalGeneration"]
    assert config["text_config"]["head_dim"] == 64
    assert config["text_config"]["attention_chunk_size"] % 128 == 0
    assert config["vision_config"]["hidden_size"] <= 64
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny / name).is_file()


def test_our_model_matches_transformers_on_make_tiny(hf_pair):
    hf, ours = hf_pair
    prompt = [ours.config.bos_token_id] + list(range(100, 400, 7))
    from model.batch import build_metadata
    from model.generate import ContiguousCache

    cache = ContiguousCache(ours, 1, len(prompt))
    pos, meta = build_metadata(ours.config, [cache.slots(0, 0, len(prompt))])
    logits = ours.logits(ours(torch.tensor(prompt), pos, meta, cache.kv))
    assert (logits - hf_logits(hf, prompt)).abs().max().item() <= 1e-4
    expected = hf_greedy(hf, prompt, 40)
    assert len(set(expected)) > 8
    assert greedy_generate(ours, [prompt], 40) == [expected]


def test_make_tiny_is_deterministic_per_seed(tiny, tmp_path):
    preset = json.loads((tiny / "config.json").read_text())["text_config"]["num_local_experts"]
    name = "tiny-maverick" if preset == 8 else "tiny-scout"
    again = make_tiny(tmp_path / "again", name, seed=1)
    other = make_tiny(tmp_path / "other", name, seed=2)
    shard = "model-00001-of-00002.safetensors"
    a, b, c = (load_file(d / shard) for d in (tiny, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bench_preset_is_the_peers_shape():
    config = Llama4Config(**TINY_PRESETS["bench"])
    params = sum(math.prod(s) for s in text_weight_shapes(config).values())
    assert 130e6 < params < 136e6  # PEERS.md: 133M parameters
    assert config.moe_layers == [1, 3, 5, 7] and config.attention_chunk_size == 256


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3 ?"}],
    [{"role": "user", "content": [{"type": "text", "text": "What is in "}, {"type": "image"},
                                  {"type": "text", "text": " this picture?"}]}],
    [{"role": "user", "content": "call it"}, {"role": "assistant", "content": "ok"},
     {"role": "tool", "content": "{\"result\": 42}"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tiny, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny)
    ours = Tokenizer(tiny)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == ids
    assert ids.count(hf.convert_tokens_to_ids("<|begin_of_text|>")) == 1


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
         {"id": "c2", "type": "function", "function": {"name": "get_weather",
                                                       "arguments": {"city": "Nice \"sud\"", "days": [1, 2]}}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "21C"}, {"role": "tool", "tool_call_id": "c2", "content": "25C"}],
]


@pytest.mark.parametrize("messages", TOOL_CONVERSATIONS)
def test_chat_template_with_tools_renders_like_transformers(tiny, messages):
    """Meta's tool layout: tools' JSON and the pythonic call instruction in the system turn, past calls as a
    pythonic list ending in <|eom|>, results as `ipython` turns."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny)
    ours = Tokenizer(tiny)
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    rendered = ours.render_chat(messages, tools=TOOLS)
    assert rendered == expected
    assert '"name": "get_weather"' in rendered and "Python list of calls" in rendered
    if len(messages) > 1:
        assert 'Be brief.\n\n' in rendered
        assert '[get_weather(city="Paris"), get_weather(city="Nice \\"sud\\"", days=[1, 2])]<|eom|>' in rendered
        assert rendered.count("<|header_start|>ipython<|header_end|>") == 2


@pytest.mark.parametrize("text", ["hello world", "  leading spaces\n\nand newlines", "naïve café ☕ 12345",
                                  "<|header_start|>user<|header_end|>", ""])
def test_tokenizer_encodes_and_decodes_like_transformers(tiny, text):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny)
    ours = Tokenizer(tiny)
    ids = hf(text)["input_ids"]
    assert ours.encode(text) == ids
    assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)


def test_special_tokens_and_generation_defaults(tiny):
    ours = Tokenizer(tiny)
    config = json.loads((tiny / "config.json").read_text())["text_config"]
    eot = ours.token_to_id("<|eot|>")
    assert config["bos_token_id"] == ours.token_to_id("<|begin_of_text|>")
    assert eot in config["eos_token_id"] and eot in ours.special_ids
    assert ours.vocab_size <= config["vocab_size"]
    defaults = load_generation_defaults(tiny)
    assert set(defaults.eos_token_ids) == set(config["eos_token_id"])
    assert defaults.sampling == {"temperature": 0.6, "top_p": 0.9}
