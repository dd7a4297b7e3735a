"""OpenAI request bodies (completions and chat), as vLLM accepts them, and their sampling parameters.

Unknown keys are ignored, as vLLM does; features this server does not have (best_of > 1, suffix) and
vLLM's removed `guided_*` fields are refused with a clear 400 rather than silently dropped. Ranges
are checked once, by `workers.sampling_params.SamplingParams.validate`, in the engine. Structured
outputs come as OpenAI's `response_format` or vLLM's `structured_outputs`; tools in `router.tools`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from router.tools import Tool, choice_mode, parse_tools, template_messages, tool_grammar
from workers.errors import InvalidRequest
from workers.sampling_params import SamplingParams
from workers.structured import GrammarSpec

Number = StrictInt | StrictFloat


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    n: StrictInt = 1
    logit_bias: dict[str, Number] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    return_token_ids: StrictBool = False
    skip_special_tokens: StrictBool = True
    prompt_logprobs: StrictInt | None = None
    user: StrictStr | None = None
    best_of: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM removed these (0.12) and now ignores them silently; here they are a 400 that says what to use
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

    def _unsupported(self) -> None:
        if self.best_of is not None and self.best_of > 1:
            raise InvalidRequest("best_of is not supported; use n", param="best_of")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed with stream: true", param="stream_options")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                     "guided_whitespace_pattern"):
            if getattr(self, name) is not None:
                raise InvalidRequest(f"{name} was removed from vLLM's API and is not supported: use "
                                     f"structured_outputs (json, regex, choice, grammar) or response_format",
                                     param=name)

    def structured(self) -> GrammarSpec | None:
        """The grammar asked for by `response_format` or `structured_outputs` (at most one of them)."""
        if self.response_format is not None and self.structured_outputs is not None:
            raise InvalidRequest("give either response_format or structured_outputs, not both",
                                 param="structured_outputs")
        if self.structured_outputs is not None:
            return _structured_outputs(self.structured_outputs)
        return _response_format(self.response_format) if self.response_format is not None else None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, echo: bool) -> SamplingParams:
        self._unsupported()
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        structured = self.structured()
        return SamplingParams(structured=structured,
            n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, repetition_penalty=self.repetition_penalty,
            logit_bias=bias, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=self.prompt_logprobs, echo=echo,
            skip_special_tokens=self.skip_special_tokens)


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids used verbatim."""
        p = self.prompt
        if isinstance(p, str):
            out: list = [p]
        elif not p:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        elif isinstance(p[0], int):
            out = [list(p)]
        else:
            out = list(p)
        for one in out:
            if len(one) == 0:
                raise InvalidRequest("prompt must not be empty", param="prompt")
        return out

    def params(self) -> SamplingParams:
        if self.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        return self.sampling_params(self.max_tokens, self.logprobs, self.echo)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "ipython", "developer"]
    content: StrictStr | list[dict[str, Any]] | None = None

    def template_message(self) -> dict[str, Any]:
        """The message as the chat template reads it: text parts, and `{"type": "image"}` for each image
        (the template writes `<|image|>`; `image_urls` gives the images in the same order)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = [_template_part(part) for part in self.content]
        if message.get("role") == "developer":
            message["role"] = "system"
        return message

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [_image_url(p) for p in self.content if isinstance(p, dict) and p.get("type") == "image_url"]


def _template_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        _image_url(part)
        return {"type": "image"}
    raise InvalidRequest(f"message content of type {kind!r} is not supported (text and image_url)",
                         param="messages")


def _image_url(part: dict[str, Any]) -> str:
    """OpenAI's `{"image_url": {"url": ...}}` (or the bare string some clients send)."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise InvalidRequest("an image_url content part needs image_url.url", param="messages")
    return url


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool = True

    def tool_mode(self) -> tuple[list[Tool], str, Tool | None]:
        """The tools, the tool_choice mode (none / auto / required / named) and the named tool."""
        tools = parse_tools(self.tools)
        mode, named = choice_mode(self.tool_choice, tools)
        return tools, mode, named

    def params(self, python_start: bool = True) -> SamplingParams:
        """`python_start`: the tokenizer has `<|python_start|>` (strict tools under auto need it)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self.sampling_params(max_tokens, logprobs, echo=False)
        tools, mode, named = self.tool_mode()
        enforced = tool_grammar(mode, named, tools, self.parallel_tool_calls, python_start)
        if enforced is not None and mode in ("required", "named") and params.structured is not None:
            raise InvalidRequest(f"tool_choice {self.tool_choice!r} already fixes the output; drop "
                                 "response_format / structured_outputs", param="tool_choice")
        if enforced is not None and params.structured is None:
            params.structured = enforced
        return params

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages([m.template_message() for m in self.messages])

    def template_tools(self) -> list[dict] | None:
        """The tools as chat templates take them (OpenAI's shape), or None."""
        return list(self.tools) if self.tools else None

    def image_urls(self) -> list[str]:
        return [url for m in self.messages for url in m.image_urls()]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    tokens: list[StrictInt]


def _response_format(fmt: dict[str, Any]) -> GrammarSpec | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", param="response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidRequest("response_format json_schema needs json_schema.name", param="response_format")
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            raise InvalidRequest("response_format json_schema needs json_schema.schema", param="response_format")
        if not isinstance(spec.get("strict", False), bool):
            raise InvalidRequest("response_format json_schema.strict must be a boolean", param="response_format")
        return GrammarSpec.json_schema(schema, param="response_format")
    raise InvalidRequest(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                         param="response_format")


STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _structured_outputs(fields: dict[str, Any]) -> GrammarSpec:
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""
    # our JSON is always compact (workers.structured.JSON_OPTIONS): vLLM's switch for that is accepted
    if not isinstance(fields.get("disable_any_whitespace", False), bool):
        raise InvalidRequest("structured_outputs.disable_any_whitespace must be a boolean",
                             param="structured_outputs")
    allowed = (*STRUCTURED_KEYS, "disable_any_whitespace")
    unknown = [k for k, v in fields.items() if v is not None and k not in allowed]
    if unknown:
        raise InvalidRequest(f"structured_outputs.{unknown[0]} is not supported (use one of "
                             f"{', '.join(STRUCTURED_KEYS)})", param="structured_outputs")
    given = [k for k in STRUCTURED_KEYS if fields.get(k) not in (None, False)]
    if len(given) != 1:
        raise InvalidRequest(f"structured_outputs needs exactly one of {', '.join(STRUCTURED_KEYS)}",
                             param="structured_outputs")
    kind, value = given[0], fields[given[0]]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return GrammarSpec.json_schema(value, param=param)
    if kind == "json_object":
        return GrammarSpec("json_object", "", param=param)
    if kind == "choice":
        return GrammarSpec.choice(value if isinstance(value, list) else [], param=param)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{param} must be a non-empty string", param=param)
    return GrammarSpec(kind, value, param=param)
