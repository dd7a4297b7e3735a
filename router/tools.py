"""Tool calling in the chat API: the request's `tools` and `tool_choice`, checked, and the grammar that
enforces them.

`tool_choice`: "none" (calls are not parsed), "auto" (parsed; the model may answer in text), "required"
or a named function (the output is a call, enforced by a grammar built from the tools' parameter
schemas, so even a random-weight model emits a valid one). Beyond vLLM: under "auto", a tool marked
`strict: true` has its arguments constrained too: the model may answer in text, but a call it opens
with `<|python_start|>` always matches its schema. Enforced calls use the JSON form
(`{"name": ..., "parameters": ...}`, a list of them under "required"), which `router.tool_parser` reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from workers.errors import InvalidRequest
from workers.structured import JSON_OPTIONS, GrammarSpec

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names (plus dots)
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict  # a JSON schema of the arguments object
    strict: bool

    def call_schema(self, constrained: bool = True) -> dict:
        return {"type": "object", "properties": {"name": {"const": self.name},
                                                 "parameters": self.parameters if constrained else ANY_OBJECT},
                "required": ["name", "parameters"], "additionalProperties": False}

    def param_names(self) -> list[str]:
        return list((self.parameters.get("properties") or {}).keys())


def parse_tools(raw: list[Any] | None) -> list[Tool]:
    tools, seen = [], set()
    for i, item in enumerate(raw or []):
        param = f"tools[{i}]"
        if not isinstance(item, dict) or item.get("type", "function") != "function" \
                or not isinstance(item.get("function"), dict):
            raise InvalidRequest(f'{param} must be {{"type": "function", "function": {{...}}}}', param="tools")
        fn = item["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidRequest(f"{param}.function.name must match {NAME.pattern}, got {name!r}", param="tools")
        if name in seen:
            raise InvalidRequest(f"{param}.function.name {name!r} is not unique", param="tools")
        seen.add(name)
        parameters = fn.get("parameters") if fn.get("parameters") is not None else ANY_OBJECT
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"{param}.function.parameters must be a JSON schema object", param="tools")
        strict = fn.get("strict", False)
        if not isinstance(strict, bool):
            raise InvalidRequest(f"{param}.function.strict must be a boolean", param="tools")
        tools.append(Tool(name, parameters, strict))
    return tools


def choice_mode(tool_choice: Any, tools: list[Tool]) -> tuple[str, Tool | None]:
    """("none" | "auto" | "required" | "named", the named tool)."""
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequest(f"tool_choice must be none, auto, required or a named function, got "
                                 f"{tool_choice!r}", param="tool_choice")
        if tool_choice != "none" and not tools:
            raise InvalidRequest(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest('a named tool_choice is {"type": "function", "function": {"name": ...}}',
                             param="tool_choice")
    named = next((t for t in tools if t.name == name), None)
    if named is None:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools "
                             f"({', '.join(t.name for t in tools) or 'none given'})", param="tool_choice")
    return "named", named


def tool_grammar(mode: str, named: Tool | None, tools: list[Tool], parallel: bool,
                 python_start: bool) -> GrammarSpec | None:
    """The grammar a tool_choice needs, or None. `python_start`: the tokenizer has `<|python_start|>`."""
    if mode == "named":
        return GrammarSpec.json_schema(named.call_schema(), param="tool_choice")
    if mode == "required":
        calls = {"type": "array", "items": {"anyOf": [t.call_schema() for t in tools]}, "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        return GrammarSpec.json_schema(calls, param="tool_choice")
    if mode == "auto" and python_start and any(t.strict for t in tools):
        one = {"anyOf": [t.call_schema(constrained=t.strict) for t in tools]}
        call = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]} if parallel else one
        call["x-guidance"] = JSON_OPTIONS
        lark = (f"start: TEXT? (<|python_start|> call <|python_end|>)?\n"
                f"TEXT: /(.|\\n)+/\n"
                f"call: %json {json.dumps(call, separators=(',', ':'))}\n")
        return GrammarSpec("grammar", lark, param="tools")
    return None


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls with their arguments as objects, as chat templates render them."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            m = {**m, "tool_calls": [_call_for_template(c) for c in calls]}
        out.append(m)
    return out


def _call_for_template(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        raise InvalidRequest("an assistant tool call's function.arguments is not JSON", param="messages") from None
    return {**call, "function": {**fn, "arguments": args}}
