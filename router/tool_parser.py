"""Llama 4 tool calls out of generated text, whole or streamed.

The checkpoints emit calls in two forms, both taken here (vLLM's parsers each miss one):
- the pythonic list Meta's prompt format asks for: `[get_weather(city="Paris"), f(a=[1, {"b": 2}])]`;
- JSON: `{"name": ..., "parameters": ...}` (also with `"type": "function"`, or `arguments`), one object,
  several separated by `;`, or a list of them (what the `required` grammar makes);
either wrapped in `<|python_start|>` ... `<|python_end|>` or not. Calls end the output: text before
them is content, and output that does not parse whole is content, never an error.

Streaming holds back text from the first place a call could start (`[`, `{`, `<|python_start|>`),
as long as what follows could still open a call, and decides at the end with the whole-text parser:
streamed content is always a prefix of the final content, so the two parsers agree.
"""

from __future__ import annotations

import ast
import json
import uuid
from dataclasses import dataclass, field

PY_START, PY_END = "<|python_start|>", "<|python_end|>"
TRAILERS = (PY_END, "<|eom|>", "<|eot|>", "<|end_of_text|>")  # may follow calls when specials are kept
STARTS = ("[", "{", "<")

DEAD, OPEN = 0, 1  # a candidate start: cannot open a call / still could (or does)
_LITERAL_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's `function.arguments`
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse(text: str, params_order: dict[str, list[str]] | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls): the calls that end `text`, and the text before them. `params_order` maps a
    tool's name to its parameter names in schema order (for positional arguments)."""
    for start in _candidates(text, 0):
        calls = _parse_calls(text[start:], params_order or {})
        if calls:
            return text[:start], calls
    return text, []


class StreamingToolParser:
    """`feed` each text delta and send what it returns as content; `finish` gives the rest of the
    content and the calls, equal to `parse` of the whole text."""

    def __init__(self, params_order: dict[str, list[str]] | None = None):
        self.params_order = params_order
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        hold = next(_candidates(self.text, self.sent), len(self.text))
        out, self.sent = self.text[self.sent:hold], hold
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse(self.text, self.params_order)
        # streamed content is a prefix of the final content (see the module doc; tested at every split)
        return content[self.sent:], calls


def _candidates(text: str, begin: int):
    """Positions >= begin where a call could start, left to right."""
    i = begin
    while True:
        hits = [p for p in (text.find(c, i) for c in STARTS) if p >= 0]
        if not hits:
            return
        i = min(hits)
        if _opening(text, i) == OPEN:
            yield i
        i += 1


def _opening(text: str, i: int) -> int:
    """Whether text[i:] opens a call, or is a prefix of an opening (OPEN), or can never be (DEAD).
    Monotonic: more text never turns DEAD into OPEN."""
    if text[i] == "<":
        rest = text[i:i + len(PY_START)]
        if not PY_START.startswith(rest):
            return DEAD
        if len(rest) < len(PY_START):
            return OPEN
        i += len(PY_START)
    i = _skip_space(text, i)
    if i >= len(text):
        return OPEN
    if text[i] == "{":
        return _json_opening(text, i)
    if text[i] != "[":
        return DEAD
    i = _skip_space(text, i + 1)
    if i >= len(text):
        return OPEN
    if text[i] == "{":
        return _json_opening(text, i)
    if not (text[i].isalpha() or text[i] == "_"):
        return DEAD
    while i < len(text) and (text[i].isalnum() or text[i] in "_."):
        i += 1
    i = _skip_space(text, i)
    if i >= len(text):
        return OPEN
    return OPEN if text[i] == "(" else DEAD


def _json_opening(text: str, i: int) -> int:
    """`{` then the key "name" or "type" (a call object's first key)."""
    i = _skip_space(text, i + 1)
    if i >= len(text):
        return OPEN
    if text[i] != '"':
        return DEAD
    end = text.find('"', i + 1)
    key = text[i + 1:] if end < 0 else text[i + 1:end]
    if end < 0:
        return OPEN if any(k.startswith(key) for k in ("name", "type")) else DEAD
    return OPEN if key in ("name", "type") else DEAD


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _strip_markers(s: str) -> str:
    s = s.strip()
    if s.startswith(PY_START):
        s = s[len(PY_START):].strip()
    changed = True
    while changed:
        changed = False
        for marker in TRAILERS:
            if s.endswith(marker):
                s, changed = s[:-len(marker)].rstrip(), True
    return s


def _parse_calls(s: str, params_order: dict[str, list[str]]) -> list[ToolCall] | None:
    body = _strip_markers(s)
    if not body:
        return None
    if body.startswith("["):
        calls = _pythonic(body, params_order)
        if calls is not None:
            return calls
    return _json_calls(body)


def _pythonic(body: str, params_order: dict[str, list[str]]) -> list[ToolCall] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts or not all(isinstance(e, ast.Call) for e in tree.elts):
        return None
    calls = []
    for call in tree.elts:
        name = _dotted(call.func)
        if name is None or any(k.arg is None for k in call.keywords):  # **kwargs: not a literal call
            return None
        try:
            args = {k.arg: _literal(k.value) for k in call.keywords}
            if call.args:
                order = params_order.get(name, [])
                free = [p for p in order if p not in args]
                if len(call.args) > len(free):
                    return None
                args.update({p: _literal(a) for p, a in zip(free, call.args)})
        except ValueError:
            return None
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.AST):
    """A Python or JSON literal (`true`, `null` too); ValueError for anything computed."""
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {_key(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values)}
    value = ast.literal_eval(node)
    if isinstance(value, complex | bytes):
        raise ValueError("not JSON")
    if isinstance(value, float) and value != value:
        raise ValueError("NaN")
    return value


def _key(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _json_calls(body: str) -> list[ToolCall] | None:
    """One JSON call object, a list of them, or several separated by `;` / `,` / whitespace."""
    decoder = json.JSONDecoder()
    objects, i = [], 0
    try:
        while i < len(body):
            value, i = decoder.raw_decode(body, i)
            objects.extend(value if isinstance(value, list) else [value])
            while i < len(body) and (body[i].isspace() or body[i] in ";,"):
                i += 1
    except (ValueError, RecursionError):
        return None
    calls = [_json_call(o) for o in objects]
    return calls if calls and all(c is not None for c in calls) else None


def _json_call(obj) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {"name", "arguments"}}
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    if set(obj) - {"name", "parameters", "arguments", "type"} or obj.get("type", "function") != "function":
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))
