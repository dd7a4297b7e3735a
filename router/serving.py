"""Completions and chat over gangs: a parsed OpenAI request → engine requests → a response body or a
stream of server-sent events. Transport-neutral apart from the SSE framing; typed errors raised
before the first byte become HTTP statuses, errors after it become a final error event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from model.images import ImageError, image_token_ids
from model.tokenizer import Tokenizer
from router import prompt_logprobs
from router.errors import HTTPError, error_body
from router.images import ImageLoader
from router.openai_models import ChatCompletionRequest, CompletionRequest
from router.openai_responses import Choice, Formatter
from router.prompt_limit import PromptLimit
from router.request_life import Deadline
from router.tool_parser import PY_START
from workers.errors import InvalidRequest
from workers.protocol import GenerateRequest, RequestOutput
from workers.structured import GrammarSpec, Grammars

log = logging.getLogger(__name__)

# (gang-side request) -> async iterator of output batches; the ingress picks the gang
StreamFn = Callable[[GenerateRequest], AsyncIterator[list[RequestOutput]]]
# Text longer than this is tokenized (a chat rendered) on a worker thread: tokenizing costs ~0.65 us a
# character here, and on the replica's event loop it stalls every stream; a thread hop costs ~50 us
OFF_LOOP_CHARS = 1024


async def off_loop(size: int, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`: here for a small input (`size` characters), on a worker thread otherwise."""
    if size < OFF_LOOP_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


@dataclasses.dataclass
class Prepared:
    """A validated request, ready to run: one engine request per prompt."""

    kind: str  # "completion" | "chat"
    requests: list[GenerateRequest]
    formatter: Formatter
    stream: bool
    include_usage: bool
    logprobs: bool
    stream_error: BaseException | None = None  # an error sent as the stream's last event (for metrics)


class Serving:
    def __init__(self, model_name: str, tokenizer: Tokenizer | None, timeout_s: float,
                 images: ImageLoader | None = None, eos_ids: list[int] | None = None,
                 limit: PromptLimit | None = None):
        self.model_name, self.tokenizer, self.timeout_s = model_name, tokenizer, timeout_s
        self.limit = limit  # prompts that surely cannot fit are refused here, before any tokenizing
        self.images = images
        self.eos_ids = eos_ids or []
        self.grammars: Grammars | None = None  # made at the first structured request

    def token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            # name what is served: a client's default model name (or a path) is the usual mistake
            raise HTTPError(404, f"The model `{model}` does not exist. Served models: `{self.model_name}`.",
                            param="model")

    async def encode(self, text: str, max_tokens: int | None) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("text prompts need a tokenizer; this server runs with --skip-tokenizer-init "
                                 "and takes token ids only", param="prompt")
        if self.limit is not None:
            self.limit.check_text(text, max_tokens, "prompt")
        return await off_loop(len(text), self.tokenizer.encode, text)

    def check_length(self, ids: list[int], max_tokens: int | None) -> list[int]:
        """`ids`, unless they surely cannot fit: then refused before they are shipped to a gang."""
        if self.limit is not None:
            self.limit.check_ids(len(ids), max_tokens)
        return ids

    # -- preparing ------------------------------------------------------------------------------------

    async def check_grammar(self, spec: GrammarSpec | None) -> None:
        """A structured-output spec compiles, or the request is refused here, before any worker sees it.
        Compiled on the grammar thread (cached by canonical form), never on this event loop."""
        if spec is None:
            return
        if self.tokenizer is None:
            raise InvalidRequest("structured outputs and tools need a tokenizer; this server runs with "
                                 "--skip-tokenizer-init", param=spec.param)
        if self.grammars is None:
            self.grammars = Grammars.for_tokenizer(self.tokenizer, self.tokenizer.vocab_size, self.eos_ids)
        await asyncio.wrap_future(self.grammars.check(spec))

    async def prepare_completion(self, body: CompletionRequest, request_id: str) -> Prepared:
        self.check_model(body.model)
        params = body.params()
        await self.check_grammar(params.structured)
        prompts = [self.check_length(p if isinstance(p, list) else await self.encode(p, params.max_tokens),
                                     params.max_tokens) for p in body.prompts()]
        requests = [GenerateRequest(ids, dataclasses.replace(params), _engine_id(request_id, i))
                    for i, ids in enumerate(prompts)]
        formatter = Formatter("completion", request_id, self.model_name, self.token_text,
                              body.return_token_ids, body.echo, prompt_logprobs=body.prompt_logprobs is not None)
        return Prepared("completion", requests, formatter, body.stream, self._usage(body),
                        body.logprobs is not None)

    async def prepare_chat(self, body: ChatCompletionRequest, request_id: str) -> Prepared:
        self.check_model(body.model)
        if self.tokenizer is None and (body.tools or body.structured_outputs or body.response_format):
            raise InvalidRequest("tools and structured outputs need a tokenizer; this server runs with "
                                 "--skip-tokenizer-init", param="tools" if body.tools else "response_format")
        python_start = self.tokenizer is not None and self.tokenizer.token_to_id(PY_START) is not None
        params = body.params(python_start)
        await self.check_grammar(params.structured)
        tools, mode, _ = body.tool_mode()
        ids, images = await self.chat_prompt(body.template_messages(), body.image_urls(), params.max_tokens,
                                             add_generation_prompt=body.add_generation_prompt,
                                             tools=body.template_tools())
        self.check_length(ids, params.max_tokens)
        parsing = {t.name: t.param_names() for t in tools} if mode != "none" else None
        formatter = Formatter("chat", request_id, self.model_name, self.token_text, body.return_token_ids,
                              tools=parsing, prompt_logprobs=body.prompt_logprobs is not None,
                              named_tool=mode == "named")
        request = GenerateRequest(ids, params, _engine_id(request_id, 0), images=images or None)
        return Prepared("chat", [request], formatter, body.stream, self._usage(body), body.logprobs)

    async def chat_prompt(self, messages: list[dict[str, Any]], image_urls: list[str], max_tokens: int | None,
                          check_fit: bool = True, **kwargs: Any) -> tuple[list[int], list]:
        """The rendered, tokenized chat with each image's placeholder tokens, and the images. With
        `check_fit`, text that surely cannot fit with `max_tokens` more is refused before tokenizing."""
        if self.tokenizer is None:
            raise InvalidRequest("chat needs a tokenizer; this server runs with --skip-tokenizer-init",
                                 param="messages")
        size = sum(len(str(m.get("content") or "")) for m in messages) + len(str(kwargs.get("tools") or ""))
        try:
            text = await off_loop(size, self.tokenizer.render_chat, messages, **kwargs)
        except Exception as exc:  # the template refused these messages (e.g. roles out of order)
            raise InvalidRequest(f"the chat template cannot render these messages: {exc}",
                                 param="messages") from None
        if check_fit and self.limit is not None:
            self.limit.check_text(text, max_tokens, "messages")
        ids = await off_loop(len(text), self.tokenizer.encode, text, add_special_tokens=False)
        return await self.with_images(ids, image_urls)

    async def with_images(self, ids: list[int], sources: list, param: str = "messages") -> tuple[list[int], list]:
        """The prompt with each `<|image|>` expanded into its image's placeholder tokens, and the images."""
        if not sources:
            return ids, []
        if self.images is None or self.tokenizer is None:
            raise InvalidRequest("images need the model's tokenizer; this server runs with --skip-tokenizer-init",
                                 param=param)
        images = await self.images.load(sources)
        try:
            return self.images.processor.expand(ids, images, image_token_ids(self.tokenizer)), images
        except ImageError as exc:
            raise InvalidRequest(str(exc), param=param) from None

    @staticmethod
    def _usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    # -- running --------------------------------------------------------------------------------------

    async def outputs(self, request: GenerateRequest, run: StreamFn) -> AsyncIterator[RequestOutput]:
        """One engine request's outputs as they come, within the server-side deadline (gRPC's reads)."""
        deadline = Deadline(self.timeout_s)
        outputs = self.merged([request], run)
        try:
            while (item := await deadline.next(outputs)) is not None:
                yield item[1]
        finally:
            await outputs.aclose()  # aborts the request in its engine unless it ended

    @staticmethod
    async def merged(requests: list[GenerateRequest], run: StreamFn) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every prompt's outputs as they come, tagged with the prompt's position; errors raised. The one
        path both doors read (HTTP here, gRPC through `outputs`)."""
        if len(requests) == 1:  # the common case: no pump task, no second queue
            batches = run(requests[0])
            try:
                async for batch in batches:
                    for out in batch:
                        if out.error is not None:
                            raise out.error
                        yield 0, out
            finally:
                await batches.aclose()  # now, not at garbage collection: it aborts the request in its engine
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, request: GenerateRequest) -> None:
            batches = run(request)
            try:
                async for batch in batches:
                    queue.put_nowait((i, batch, None))
                queue.put_nowait((i, None, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, cancellation included
                queue.put_nowait((i, None, exc))
            finally:
                await batches.aclose()

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            open_streams = len(tasks)
            while open_streams:
                i, batch, exc = await queue.get()
                if exc is not None:
                    raise exc
                if batch is None:
                    open_streams -= 1
                    continue
                for out in batch:
                    if out.error is not None:
                        raise out.error
                    yield i, out
        finally:
            for task in tasks:
                task.cancel()

    async def run_full(self, prepared: Prepared, run: StreamFn) -> dict:
        n = prepared.requests[0].params.n
        choices = [Choice(i * n + j, r.prompt_token_ids) for i, r in enumerate(prepared.requests) for j in range(n)]
        async with Deadline(self.timeout_s).bound():
            async for i, out in self.merged(prepared.requests, run):
                choices[i * n + out.index].add(out)
        for c in choices:  # echo shows them on every choice
            c.prompt_logprobs = prompt_logprobs.for_choice(choices, c.index, n)
        lens = [len(r.prompt_token_ids) for r in prepared.requests]
        return prepared.formatter.response(choices, lens, prepared.logprobs)

    async def start_stream(self, prepared: Prepared, run: StreamFn, request_id: str) -> AsyncIterator[str]:
        """SSE events. The first output is awaited here, so an error before it raises (→ a status code)."""
        merged = self.merged(prepared.requests, run)
        deadline = Deadline(self.timeout_s)
        try:
            first = await deadline.next(merged)
        except BaseException:
            await merged.aclose()
            raise
        return self._events(prepared, merged, first, deadline, request_id)

    async def _events(self, prepared: Prepared, merged, first, deadline: Deadline,
                      request_id: str) -> AsyncIterator[str]:
        n = prepared.requests[0].params.n
        choices = [Choice(i * n + j, r.prompt_token_ids) for i, r in enumerate(prepared.requests) for j in range(n)]
        started: set[int] = set()
        fmt = prepared.formatter
        try:
            item = first
            while item is not None:
                i, out = item
                choice = choices[i * n + out.index]
                choice.add(out)
                is_first = choice.index not in started
                started.add(choice.index)
                prompt_lps = prompt_logprobs.for_choice(choices, choice.index, n)
                for body in fmt.chunks(choice.index, out, prepared.logprobs, is_first,
                                       choice.prompt_token_ids, prompt_lps):
                    yield _sse(body)
                item = await deadline.next(merged)
            if prepared.include_usage:
                yield _sse(fmt.usage_chunk(choices, [len(r.prompt_token_ids) for r in prepared.requests]))
        except Exception as exc:  # after the first byte (a passed deadline too): an error event, then [DONE]
            prepared.stream_error = exc
            yield self._error_event(exc, request_id)
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"

    @staticmethod
    def _error_event(exc: BaseException, request_id: str) -> str:
        status, body = error_body(exc, request_id)
        log.warning("request %s: %d after the stream started: %s", request_id, status, body["error"]["message"])
        return _sse(body)


def _engine_id(request_id: str, prompt: int) -> str:
    """Unique in the engine even when a client reuses its x-request-id; the request id stays readable."""
    return f"{request_id}-{prompt}-{uuid.uuid4().hex[:8]}"


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
