"""Engine outputs → OpenAI response bodies and stream chunks (completions and chat), shaped so the
official `openai` client parses them. vLLM's extensions: `stop_reason`, `token_ids` and
`prompt_token_ids` (with `return_token_ids`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

from router.tool_parser import StreamingToolParser, ToolCall, parse
from workers.protocol import RequestOutput


@dataclass
class Choice:
    """Everything one choice has produced so far."""

    index: int
    prompt_token_ids: list[int]
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # workers.sampler.TokenLogprob per token
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text_delta or "")
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            if out.usage is not None:
                self.completion_tokens, self.cached_tokens = out.usage.completion_tokens, out.usage.cached_tokens


def cached_prompt_tokens(choices: list[Choice], num_prompts: int) -> int:
    """Prompt tokens served by the prefix cache, each prompt counted once (by its first choice: later
    choices read the prompt the first one computed, so their hits are not the client's cache hits).
    Always present, 0 when nothing was cached, as `aiperf` and OpenAI clients expect."""
    n = max(1, len(choices) // max(1, num_prompts))
    return sum(c.cached_tokens for c in choices if c.index % n == 0)


class Formatter:
    """Builds bodies for one request; `token_text` maps a token id to its text (for logprobs)."""

    def __init__(self, kind: str, request_id: str, model: str, token_text: Callable[[int], str],
                 return_token_ids: bool = False, echo: bool = False, tools: dict[str, list[str]] | None = None,
                 prompt_logprobs: bool = False, named_tool: bool = False):
        """`tools`: parse tool calls out of chat outputs (each tool's parameter names, for positional
        arguments); None leaves the text as content. `prompt_logprobs`: the client asked for them.
        `named_tool`: tool_choice named the function, so a call keeps the engine's finish reason (`stop`,
        OpenAI's rule, which vLLM follows) instead of `tool_calls`."""
        self.kind, self.model, self.token_text = kind, model, token_text
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self.return_token_ids, self.echo = return_token_ids, echo
        self.tools = tools
        self.named_tool = named_tool
        self.prompt_logprobs = prompt_logprobs
        self._parsers: dict[int, StreamingToolParser] = {}  # per streamed choice

    # -- logprobs -------------------------------------------------------------------------------------

    def _top(self, lp) -> dict[str, float]:
        top = {self.token_text(lp.token_id): lp.logprob}
        for token, value in lp.top:
            top.setdefault(self.token_text(token), value)
        return top

    def completion_logprobs(self, logprobs: list, prompt_ids: list[int] | None, prompt_lps: list | None,
                            offset: int = 0) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        if prompt_ids is not None:  # echo: the prompt's tokens first, the first one without a logprob
            for token, lp in zip(prompt_ids, prompt_lps or [None] * len(prompt_ids)):
                tokens.append(self.token_text(token))
                values.append(None if lp is None else lp.logprob)
                tops.append(None if lp is None else self._top(lp))
        for lp in logprobs:
            tokens.append(self.token_text(lp.token_id))
            values.append(lp.logprob)
            tops.append(self._top(lp))
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def prompt_logprobs_body(self, lps: list | None) -> list | None:
        """vLLM's shape: per prompt token (None for the first) {token id: {logprob, rank, decoded_token}},
        the prompt's own token first, then the top alternatives."""
        out = []
        for lp in lps or []:
            if lp is None:
                out.append(None)
                continue
            entry = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank,
                                        "decoded_token": self.token_text(lp.token_id)}}
            for rank, (token, value) in enumerate(lp.top, 1):
                entry.setdefault(str(token), {"logprob": value, "rank": rank, "decoded_token": self.token_text(token)})
            out.append(entry)
        return out

    def chat_logprobs(self, logprobs: list) -> dict:
        def entry(token: int, value: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]}

    # -- whole responses ------------------------------------------------------------------------------

    def usage(self, choices: list[Choice], prompt_lens: list[int]) -> dict:
        prompt = sum(prompt_lens)
        completion = sum(c.completion_tokens for c in choices)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        usage["prompt_tokens_details"] = {"cached_tokens": cached_prompt_tokens(choices, len(prompt_lens))}
        return usage

    def response(self, choices: list[Choice], prompt_lens: list[int], logprobs: bool) -> dict:
        body = {"id": self.id, "created": self.created, "model": self.model}
        if self.kind == "chat":
            body["object"] = "chat.completion"
            body["choices"] = [self._chat_choice(c, logprobs) for c in choices]
            if self.return_token_ids and choices:
                body["prompt_token_ids"] = choices[0].prompt_token_ids
            if self.prompt_logprobs and choices:  # one prompt: vLLM puts them beside the choices
                body["prompt_logprobs"] = self.prompt_logprobs_body(choices[0].prompt_logprobs)
        else:
            body["object"] = "text_completion"
            body["choices"] = [self._completion_choice(c, logprobs) for c in choices]
        body["usage"] = self.usage(choices, prompt_lens)
        return body

    def _chat_choice(self, c: Choice, logprobs: bool) -> dict:
        message: dict = {"role": "assistant", "content": "".join(c.text)}
        finish_reason = c.finish_reason
        if self.tools is not None:
            content, calls = parse(message["content"], self.tools)
            if calls:
                message = {"role": "assistant", "content": content or None,
                           "tool_calls": [call.openai() for call in calls]}
                finish_reason = finish_reason if self.named_tool else "tool_calls"
        choice = {"index": c.index, "message": message,
                  "logprobs": self.chat_logprobs(c.logprobs) if logprobs else None,
                  "finish_reason": finish_reason, "stop_reason": c.stop_reason}
        if self.return_token_ids:
            choice["token_ids"] = c.token_ids
        return choice

    def _completion_choice(self, c: Choice, logprobs: bool) -> dict:
        lps = None
        if logprobs:
            echo_ids = c.prompt_token_ids if self.echo else None
            lps = self.completion_logprobs(c.logprobs, echo_ids, c.prompt_logprobs)
        choice = {"index": c.index, "text": "".join(c.text), "logprobs": lps,
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if self.prompt_logprobs:
            choice["prompt_logprobs"] = self.prompt_logprobs_body(c.prompt_logprobs)
        if self.return_token_ids:
            choice["token_ids"] = c.token_ids
            choice["prompt_token_ids"] = c.prompt_token_ids
        return choice

    # -- stream chunks --------------------------------------------------------------------------------

    def chunks(self, index: int, out: RequestOutput, logprobs: bool, first: bool, prompt_ids: list[int],
               prompt_lps: list | None) -> list[dict]:
        """The stream chunks of one output: one, or with tools, content held back while a call may be
        starting, and at the choice's end the rest of the content, then each call (a first delta with
        id, type and name, then its arguments), then the finish."""
        if self.tools is None or self.kind != "chat":
            return [self.chunk(index, out, logprobs, first, prompt_ids, prompt_lps)]
        parser = self._parsers.setdefault(index, StreamingToolParser(self.tools))
        text = parser.feed(out.text_delta or "")
        calls: list[ToolCall] = []
        if out.finished:
            rest, calls = parser.finish()
            text += rest
            del self._parsers[index]
        body = self.chunk(index, _with_text(out, text, None if out.finished else out.finish_reason),
                          logprobs, first, prompt_ids, prompt_lps)
        if not out.finished:
            return [body]
        out_chunks = [body] if (text or first or body["choices"][0]["logprobs"]) else []
        for i, call in enumerate(calls):
            named = call.openai(i)
            named["function"] = {"name": call.name, "arguments": ""}
            out_chunks.append(self._delta(index, {"tool_calls": [named]}))
            arguments = {"index": i, "function": {"arguments": call.arguments}}
            out_chunks.append(self._delta(index, {"tool_calls": [arguments]}))
        end = self._delta(index, {}, "tool_calls" if calls and not self.named_tool else out.finish_reason)
        end["choices"][0]["stop_reason"] = out.stop_reason
        return out_chunks + [end]

    def _delta(self, index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def chunk(self, index: int, out: RequestOutput, logprobs: bool, first: bool, prompt_ids: list[int],
              prompt_lps: list | None) -> dict:
        text = out.text_delta or ""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta,
                      "logprobs": self.chat_logprobs(out.logprobs or []) if logprobs else None}
            obj = "chat.completion.chunk"
        else:
            lps = None
            if logprobs:
                echo_ids = prompt_ids if self.echo and first else None
                lps = self.completion_logprobs(out.logprobs or [], echo_ids, prompt_lps)
            choice = {"index": index, "text": text, "logprobs": lps}
            obj = "text_completion"
        choice["finish_reason"] = out.finish_reason
        if out.finished:
            choice["stop_reason"] = out.stop_reason
        if self.return_token_ids:
            choice["token_ids"] = out.new_token_ids
            if first and self.kind != "chat":
                choice["prompt_token_ids"] = prompt_ids
        if self.prompt_logprobs and first and self.kind != "chat":
            choice["prompt_logprobs"] = self.prompt_logprobs_body(prompt_lps)
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if self.return_token_ids and first and self.kind == "chat":
            body["prompt_token_ids"] = prompt_ids
        if self.prompt_logprobs and first and self.kind == "chat":
            body["prompt_logprobs"] = self.prompt_logprobs_body(prompt_lps)
        return body

    def usage_chunk(self, choices: list[Choice], prompt_lens: list[int]) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage(choices, prompt_lens)}


def _with_text(out: RequestOutput, text: str, finish_reason: str | None) -> RequestOutput:
    return dataclasses.replace(out, text_delta=text, finish_reason=finish_reason)
