"""Structured outputs and tool calls over HTTP, through the official `openai` client, on a random-weight
checkpoint served by a 1 attention + 2 expert gang: every constrained output must parse and validate,
whatever the weights."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.timeout(600)

ADDRESS = {"type": "object", "properties": {
    "street": {"type": "string", "maxLength": 12},
    "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}},
    "required": ["street", "zip"], "additionalProperties": False}
# nested objects, arrays with min/max items, enums, bounded integers and numbers, strings (escapes are
# whatever the model draws), required and optional keys, $defs references
SCHEMA = {
    "type": "object",
    "$defs": {"address": ADDRESS},
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "home": {"$ref": "#/$defs/address"},
        "nickname": {"type": "string", "maxLength": 8},
        "motto": {"enum": ['say "hi"', "back\\slash", "tab\tand\nnewline", "ünï ☕"]},  # escapes every time
    },
    "required": ["name", "age", "role", "tags", "home", "motto"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 16},
        "filters": {"type": "array", "items": {"enum": ["news", "web"]}, "maxItems": 2}},
        "required": ["query"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=300)


def _many(make, count: int) -> list:
    """`count` requests at once (the gang batches them)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: make(i), range(count)))


def test_json_schema_100_of_100_validate_greedy_and_sampled(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}

    def ask(i):  # 25 requests of n=4: seeded sampling, and one greedy request
        kw = dict(temperature=0.0) if i == 0 else dict(temperature=1.0, seed=i, n=4)
        return client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt,
                                              max_completion_tokens=160, **kw)

    outs = _many(ask, 26)
    choices = [c for out in outs for c in out.choices]
    assert len(choices) >= 100
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_and_structured_outputs_regex_choice(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                         max_completion_tokens=40, temperature=1.0, seed=3, n=4)
    for c in out.choices:  # a random model may not close a free-form object within 40 tokens
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    pattern = r"[A-Z][a-z]{2,5}-\d{3}"
    out = client.completions.create(model="tiny", prompt="Code:", max_tokens=30, temperature=1.0, seed=5, n=4,
                                    extra_body={"structured_outputs": {"regex": pattern}})
    for c in out.choices:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c.text
    options = ["yes", "no", "maybe, later"]
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=1.0,
                                         seed=7, n=4, extra_body={"structured_outputs": {"choice": options}})
    assert all(c.message.content in options for c in out.choices)
    grammar = 'start: "x" NUM ("," NUM)*\nNUM: /[0-9]{1,2}/'
    out = client.completions.create(model="tiny", prompt="List:", max_tokens=30, temperature=0.0,
                                    extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"x\d{1,2}(,\d{1,2})*", out.choices[0].text), out.choices[0].text


def _valid_calls(message) -> list:
    calls = message.tool_calls or []
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


def test_named_tool_and_required_always_call_validly(client):
    named = {"type": "function", "function": {"name": "get_weather"}}

    def ask(i):
        choice = named if i % 2 else "required"
        return client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                              max_completion_tokens=600, temperature=1.0, seed=i, n=4)

    outs = _many(ask, 50)  # 100 choices under each tool_choice
    assert sum(len(o.choices) for o in outs) >= 200
    for i, out in enumerate(outs):
        for c in out.choices:
            # OpenAI's rule, as vLLM's: a named function's call ends with stop
            assert c.finish_reason == ("stop" if i % 2 else "tool_calls"), c.message
            calls = _valid_calls(c.message)
            assert calls and (not c.message.content)
            if i % 2:
                assert [x.function.name for x in calls] == ["get_weather"]


def test_parallel_tool_calls_false_allows_one_call(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_completion_tokens=120, temperature=1.0,
                                         seed=11, n=8)
    assert all(len(_valid_calls(c.message)) == 1 for c in out.choices)


@pytest.mark.parametrize("tool_choice, finish", [
    ("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")])
def test_streamed_tool_calls_equal_the_whole_response(client, tool_choice, finish):
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_completion_tokens=120,
              temperature=1.0, seed=21)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    content, ended, first_delta = "", None, {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            ended = c.finish_reason or ended
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
                if d.id:  # the first delta of a call names it
                    first_delta[d.index] = (d.id, d.type, d.function.name)
                    slot["name"] = d.function.name
                slot["arguments"] += d.function.arguments or ""
    assert ended == finish == whole.finish_reason and content == ""
    assert [calls[i] for i in sorted(calls)] == [{"name": x.function.name, "arguments": x.function.arguments}
                                                 for x in whole.message.tool_calls]
    assert all(t == "function" and n for _, t, n in first_delta.values())


def test_strict_tool_under_auto_calls_validly_or_answers_text(client):
    strict = [{**WEATHER, "function": {**WEATHER["function"], "strict": True}}]
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=strict, max_completion_tokens=60,
                                         temperature=1.0, seed=2, n=8)
    for c in out.choices:
        _valid_calls(c.message)  # any call it made matches the schema; text answers are fine


def test_tool_results_render_and_none_leaves_text(client):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                         max_completion_tokens=8, temperature=0.0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "strng"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}, "name"),
    # llguidance's own position and excerpt are of its Lark wrapper: a regex's error says only what is wrong
    ({"structured_outputs": {"regex": "a(b"}}, 'structured_outputs.regex: invalid regex "a(b": unclosed group'),
    ({"structured_outputs": {"grammar": 'start: "x" NUM\nNUM: /[0-9/'}},
     'line 2 column 6: invalid regex "[0-9": unclosed character class'),
    ({"structured_outputs": {"grammar": "start: foo"}}, 'line 1 column 8: unknown name: "foo"'),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"guided_json": {"type": "object"}}, "structured_outputs"),
    ({"guided_regex": "a+"}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
])
def test_bad_specs_get_a_400_naming_the_problem(live, client, body, message):
    import urllib.error
    import urllib.request

    payload = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **body}
    req = urllib.request.Request(live.v1 + "/chat/completions", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400
    error = json.loads(err.value.read())["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error
    # and the server goes on serving
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=2).choices
