"""`maverick.v1.Generation` on the ingress: the gRPC door, served by Ray Serve's gRPC proxy, which calls
the ingress methods named like the RPCs. Same fields, defaults, validation and error table as HTTP;
the API key arrives as `authorization: Bearer <key>` metadata. A client cancel or deadline cancels
the call in the replica, which cancels the gang stream and so aborts the request in its engine.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from router import maverick_v1_pb2 as pb
from router import prompt_logprobs
from router.errors import HTTPError, error_body, grpc_code_name
from router.http_guard import key_matches
from router.openai_responses import Choice, cached_prompt_tokens
from workers.errors import InvalidRequest
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams
from workers.structured import GrammarSpec

log = logging.getLogger(__name__)

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "prompt_logprobs",
             "repetition_penalty")


def sampling_params(req: pb.GenerateRequest) -> SamplingParams:
    fields = {name: getattr(req, name) for name in _OPTIONAL if req.HasField(name)}
    return SamplingParams(
        n=req.n if req.HasField("n") else 1, **fields,
        presence_penalty=req.presence_penalty if req.HasField("presence_penalty") else 0.0,
        frequency_penalty=req.frequency_penalty if req.HasField("frequency_penalty") else 0.0,
        logit_bias=dict(req.logit_bias), stop=list(req.stop), stop_token_ids=list(req.stop_token_ids),
        ignore_eos=req.ignore_eos, echo=req.echo,
        skip_special_tokens=req.skip_special_tokens if req.HasField("skip_special_tokens") else True,
        structured=structured_spec(req))


def structured_spec(req: pb.GenerateRequest) -> GrammarSpec | None:
    """The `structured` field as the grammar HTTP's response_format / structured_outputs would give."""
    if not req.HasField("structured"):
        return None
    kind = req.structured.WhichOneof("kind")
    param = f"structured.{kind}"
    if kind is None:
        raise InvalidRequest("structured needs one of json_schema, json_object, regex, choice, grammar",
                             param="structured")
    if kind == "json_schema":
        return GrammarSpec.json_schema(req.structured.json_schema, param=param)
    if kind == "json_object":
        return GrammarSpec("json_object", "", param=param) if req.structured.json_object else None
    if kind == "choice":
        return GrammarSpec.choice(list(req.structured.choice.options), param=param)
    value = getattr(req.structured, kind)
    if not value:
        raise InvalidRequest(f"{param} must not be empty", param=param)
    return GrammarSpec(kind, value, param=param)


def _logprobs(lps) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in lps or []]


def _choice(index: int, token_ids: list[int], text: str | None, finish_reason: str | None,
            stop_reason: int | str | None, logprobs: list | None) -> pb.Choice:
    choice = pb.Choice(index=index, token_ids=token_ids, finish_reason=finish_reason or "",
                       logprobs=_logprobs(logprobs))
    if text is not None:  # absent without a tokenizer
        choice.text = text
    if stop_reason is not None:
        choice.stop_reason = str(stop_reason)
    return choice


def _usage(choices: list[Choice]) -> pb.Usage:
    """One prompt's usage, counted as HTTP counts it (`router.openai_responses`)."""
    return pb.Usage(prompt_tokens=len(choices[0].prompt_token_ids) if choices else 0,
                    completion_tokens=sum(c.completion_tokens for c in choices),
                    cached_tokens=cached_prompt_tokens(choices, 1))


class StreamRejected(Exception):
    """Raised after the status is set on the context: Serve's proxy then sends that status (not INTERNAL)
    to a streaming client."""


class GenerationService:
    """Mixed into the ingress deployment (needs `config`, `serving`, `tokenizer`, `admission`,
    `_runner`). Each call's life (ticket, admission, deadline, one outcome) is `router.request_life`'s."""

    async def _grpc_request(self, req: pb.GenerateRequest, context, request_id: str) -> GenerateRequest:
        api_key = self.config.api_key
        if api_key is not None:
            metadata = dict(context.invocation_metadata())
            if not key_matches(metadata.get("authorization"), api_key):
                raise HTTPError(401, "missing or invalid API key (metadata 'authorization: Bearer <key>')")
        self.serving.check_model(req.model or None)
        if req.HasField("prompt") == bool(req.prompt_token_ids):
            raise InvalidRequest("give exactly one of prompt and prompt_token_ids", param="prompt")
        params = sampling_params(req)
        ids = list(req.prompt_token_ids) if req.prompt_token_ids else await self.serving.encode(req.prompt,
                                                                                                params.max_tokens)
        ids, images = await self.serving.with_images(ids, list(req.images), param="images")
        self.serving.check_length(ids, params.max_tokens)
        await self.serving.check_grammar(params.structured)
        return GenerateRequest(ids, params, request_id, images=images or None)

    def _grpc_error(self, exc: BaseException, context, request_id: str) -> None:
        _, body = error_body(exc, request_id)
        code = grpc.StatusCode[grpc_code_name(exc)]
        context.set_code(code)
        context.set_details(body["error"]["message"])
        context.set_trailing_metadata([("request_id", request_id)])
        log.info("grpc request %s: %s", request_id, code)

    async def Generate(self, req: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        request_id = uuid.uuid4().hex
        life = self.admission.open("Generate", "grpc")

        async def work() -> pb.GenerateResponse:
            request = await self._grpc_request(req, grpc_context, request_id)
            life.admit()
            choices: dict[int, Choice] = {}
            async for out in self.serving.outputs(request, self._runner()):
                choices.setdefault(out.index, Choice(out.index, request.prompt_token_ids)).add(out)
            done = [choices[i] for i in sorted(choices)]
            has_text = self.tokenizer is not None
            return pb.GenerateResponse(
                request_id=request_id, model=self.config.model_name, usage=_usage(done),
                prompt_token_ids=request.prompt_token_ids,
                prompt_logprobs=_logprobs(prompt_logprobs.without_first(
                    prompt_logprobs.for_choice(done, 0, request.params.n) if done else None)),
                choices=[_choice(c.index, c.token_ids, "".join(c.text) if has_text else None, c.finish_reason,
                                 c.stop_reason, c.logprobs) for c in done])

        def refuse(exc: Exception) -> pb.GenerateResponse:
            self._grpc_error(exc, grpc_context, request_id)
            return pb.GenerateResponse()

        return await life.run(work, refuse)

    async def GenerateStream(self, req: pb.GenerateRequest, grpc_context):
        request_id = uuid.uuid4().hex
        life = self.admission.open("GenerateStream", "grpc")

        def refuse(exc: Exception) -> None:
            self._grpc_error(exc, grpc_context, request_id)
            raise StreamRejected(request_id) from None  # a stream's status reaches the client only this way

        with life.carry(refuse=refuse):
            request = await self._grpc_request(req, grpc_context, request_id)
            life.admit()
            has_text = self.tokenizer is not None
            first = True
            choices = [Choice(j, request.prompt_token_ids) for j in range(request.params.n)]
            open_choices = request.params.n
            async for out in self.serving.outputs(request, self._runner()):
                choices[out.index].add(out)  # the same tally as HTTP's
                text = (out.text_delta or "") if has_text else None
                choice = _choice(out.index, out.new_token_ids, text, out.finish_reason, out.stop_reason, out.logprobs)
                message = pb.GenerateResponse(request_id=request_id, model=self.config.model_name, choices=[choice])
                if first:
                    message.prompt_token_ids.extend(request.prompt_token_ids)
                    first = False
                if out.prompt_logprobs:  # they come once, with the output that carries them
                    message.prompt_logprobs.extend(_logprobs(prompt_logprobs.without_first(out.prompt_logprobs)))
                open_choices -= out.finished
                if not open_choices:
                    message.usage.CopyFrom(_usage(choices))
                    life.outcome = "ok"  # a client that leaves after the last message has had it all
                yield message
