"""The Llama 4 tool-call parser as a table of cases; the streaming parser, fed one character at a time
and split at every point, must give the same content and calls as the whole-text parser."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from router.tool_parser import StreamingToolParser, parse

ORDER = {"get_weather": ["city", "unit"], "f": ["a", "b"]}

# (output text, expected content, expected [(name, arguments as objects)])
CASES = [
    ('[get_weather(city="Paris")]', "", [("get_weather", {"city": "Paris"})]),
    ('[get_weather(city="Paris"), f(a=[1, {"b": 2}])]', "",
     [("get_weather", {"city": "Paris"}), ("f", {"a": [1, {"b": 2}]})]),
    ('[f(a={"x": [1, [2, [3]]], "y": {"z": None}}, b=True)]', "", [("f", {"a": {"x": [1, [2, [3]]], "y": {"z": None}},
                                                                          "b": True})]),
    ('[f(a="commas, (brackets) [x] {y}", b=\'single "quotes"\')]', "",
     [("f", {"a": "commas, (brackets) [x] {y}", "b": 'single "quotes"'})]),
    ('[f(a="esc \\"q\\" \\\\ \\n tab\\t", b="ünï")]', "", [("f", {"a": 'esc "q" \\ \n tab\t', "b": "ünï"})]),
    ('[f("pos", 2)]', "", [("f", {"a": "pos", "b": 2})]),
    ('[f("pos", b=3)]', "", [("f", {"a": "pos", "b": 3})]),
    ('[f(a=true, b=null)]', "", [("f", {"a": True, "b": None})]),
    ('[f(a=-1.5e3, b=(1, 2))]', "", [("f", {"a": -1500.0, "b": [1, 2]})]),
    ('[pkg.tool(x=1)]', "", [("pkg.tool", {"x": 1})]),
    ('[f()]', "", [("f", {})]),
    ('<|python_start|>[get_weather(city="Paris")]<|python_end|>', "", [("get_weather", {"city": "Paris"})]),
    ('<|python_start|>[get_weather(city="Paris")]<|python_end|><|eom|>', "", [("get_weather", {"city": "Paris"})]),
    ('Let me check that. [get_weather(city="Oslo")]', "Let me check that. ", [("get_weather", {"city": "Oslo"})]),
    ('Sure:\n<|python_start|>[f(a=1)]<|python_end|>', "Sure:\n", [("f", {"a": 1})]),
    ('See [1] and [2]. [f(a=1)]', "See [1] and [2]. ", [("f", {"a": 1})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ('{"type": "function", "name": "f", "parameters": {"a": [1, 2]}}', "", [("f", {"a": [1, 2]})]),
    ('<|python_start|>{"name": "f", "parameters": {"a": "}{,"}}<|python_end|>', "", [("f", {"a": "}{,"})]),
    ('{"name": "f", "arguments": "{\\"a\\": 1}"}', "", [("f", {"a": 1})]),
    ('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": null}}', "", [("f", {}), ("g", {"x": None})]),
    ('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]', "", [("f", {"a": 1}), ("g", {})]),
    ('I will call it: {"name": "f", "parameters": {"a": 2}}', "I will call it: ", [("f", {"a": 2})]),
    # malformed or not calls: all content
    ('[get_weather(city="Paris"', '[get_weather(city="Paris"', []),
    ('[get_weather(city=Paris)]', '[get_weather(city=Paris)]', []),
    ('[f(a=1)] and then more text', '[f(a=1)] and then more text', []),
    ('[f(**kw)]', '[f(**kw)]', []),
    ('[f(a=1+2)]', '[f(a=1+2)]', []),
    ('[1, 2, 3]', '[1, 2, 3]', []),
    ('{"name": "f"', '{"name": "f"', []),
    ('{"name": 3, "parameters": {}}', '{"name": 3, "parameters": {}}', []),
    ('{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": [1]}', []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
    ('a < b and {x}', 'a < b and {x}', []),
    ('[' * 500, '[' * 500, []),
    ('Plain answer.', 'Plain answer.', []),
    ('', '', []),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _streamed(pieces):
    parser = StreamingToolParser(ORDER)
    content = "".join(parser.feed(p) for p in pieces)
    rest, calls = parser.finish()
    return content + rest, calls


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text(text, content, calls):
    got_content, got_calls = parse(text, ORDER)
    assert got_content == content
    assert _calls(got_calls) == calls


@pytest.mark.parametrize("text, content, calls", CASES)
def test_streamed_char_by_char_and_at_every_split(text, content, calls):
    for pieces in [list(text)] + [[text[:k], text[k:]] for k in range(len(text) + 1)]:
        got_content, got_calls = _streamed(pieces)
        assert got_content == content
        assert _calls(got_calls) == calls


def test_no_partial_call_text_leaks_into_streamed_content():
    text = 'Checking. <|python_start|>[get_weather(city="Paris")]<|python_end|>'
    parser = StreamingToolParser(ORDER)
    sent = "".join(parser.feed(ch) for ch in text)
    assert sent == "Checking. "


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='[](){}"=,: <|>abcf_xyz0123456789\\n', max_size=60), st.data())
def test_streaming_equals_whole_on_arbitrary_text(text, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    content, calls = parse(text, ORDER)
    got_content, got_calls = _streamed(pieces)
    assert got_content == content and _calls(got_calls) == _calls(calls)
