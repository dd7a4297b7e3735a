"""The ingress deployment: the OpenAI-compatible HTTP app (and, mixed in, the gRPC service) in front of
the gangs.

Its routes parse and validate; each generation request's life (ticket, admission: beyond
`max_pending_requests` in flight 429 + Retry-After, deadline, one outcome) is `router.request_life`'s,
the same for both doors. Engine requests go to a ready gang through `cluster.gang_pool`, which picks
one (prefix affinity balanced against load) and streams from its attention workers directly (the gang
replica only builds and watches its gang); a request whose gang fails moves on (`router.resume`).
Every error maps through the one table in `router.errors`. Admission and routing are per ingress
replica. Readiness is true only when every gang has produced a token and the ingress is not draining;
draining turns new requests away with 503 while in-flight ones finish.
"""


import asyncio
import dataclasses
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, StreamingResponse

from cluster.config import AppConfig
from cluster.gang_pool import GangPool
from model.images import ImageProcessor
from model.tokenizer import Tokenizer, load_generation_defaults
from router.errors import HTTPError, error_response
from router.grpc_service import GenerationService
from router.http_guard import BodyTooLarge, Guard, GuardSettings
from router.images import ImageLoader
from router.metrics import RequestMetrics, outcome_of
from router.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from router.prompt_limit import PromptLimit
from router.request_life import Admission, RequestLife
from router.resume import ResumeStats, resumable
from router.serving import Prepared, Serving, off_loop
from workers.errors import EngineError, InvalidRequest, Unavailable
from workers.protocol import GenerateRequest

log = logging.getLogger(__name__)
OFF_LOOP_BODY_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread (~1 ms a 64 KB body here)

api = FastAPI(title="maverick", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(Guard)


@api.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException):
    return error_response(HTTPError(exc.status_code, str(exc.detail)), _rid(request))


def _rid(request: Request) -> str:
    return getattr(request.state, "request_id", "unknown")


async def _parse(request: Request, model_cls):
    raw = await request.body()
    if len(raw) < OFF_LOOP_BODY_BYTES:
        return _decode(raw, model_cls)
    return await asyncio.to_thread(_decode, raw, model_cls, True)


def _int(text: str) -> int:
    return int(text)


def _same(obj: dict) -> dict:
    return obj


def _decode(raw: bytes, model_cls, on_thread: bool = False):
    try:
        # the C decoder holds the GIL for a whole body (~13 ms a MB of token ids); a Python hook per number
        # and object lets the event loop's thread take it back every switch interval meanwhile
        data = json.loads(raw, parse_int=_int, object_hook=_same) if on_thread else json.loads(raw)
    except ValueError as exc:  # not UTF-8, not JSON, or a number past Python's 4300 digits
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # a hostile body of thousands of nested brackets
        raise InvalidRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


# defined before the deployment class: in the replica, a module global defined after it was not found
# (a NameError at the first stream)
async def _carried(events, prepared: Prepared, life: RequestLife):
    """The SSE events, ending the request when they end (an error event sets its outcome)."""
    with life.carry(ended=lambda: outcome_of(prepared.stream_error)):
        async for event in events:
            yield event


@serve.deployment
@serve.ingress(api)
class Ingress(GenerationService):
    async def __init__(self, args: dict, gangs):
        self.config = config = AppConfig.model_validate(args).with_api_key_from_env()
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(config.model)
        images = ImageLoader(ImageProcessor.from_model_dir(config.model), config.images) if self.tokenizer else None
        eos = load_generation_defaults(config.model).eos_token_ids if self.tokenizer else []
        limit = PromptLimit.for_model(config.engine.max_model_len, config.model, self.tokenizer)
        self.serving = Serving(config.model_name, self.tokenizer, config.request_timeout_s, images, eos, limit)
        self.created = int(time.time())
        self.metrics = RequestMetrics(config.model_name, config.metrics.enabled)
        self.admission = Admission(self.metrics, config.max_pending_requests)
        consumer = f"ingress-{serve.get_replica_context().replica_tag}-{uuid.uuid4().hex[:8]}"
        self.gangs = GangPool(gangs, consumer,
                              on_status=lambda: self.metrics.gangs(self.gangs.gangs, self.gangs.left,
                                                                   self.gangs.leaving))
        self.resume_stats = ResumeStats()
        api.state.guard = GuardSettings(config.api_key, config.max_body_bytes, self.metrics)
        self.gangs.start()

    def _runner(self):
        """A function streaming one engine request's output batches, from the gang the pool picks and,
        when that gang fails, from the next (`router.resume`)."""

        async def run(request: GenerateRequest):
            clock = self.metrics.engine_request(len(request.prompt_token_ids))
            # always resumable: a leaving gang's requests move even when failures may not (limit 0)
            batches = resumable(request, self.gangs.stream, self.config.migration_limit, self.resume_stats)
            try:
                async for batch in batches:
                    clock.outputs(batch)
                    yield batch
            finally:  # timed out, failed or abandoned: its `finally` aborts it in the engine now
                await batches.aclose()

        return run

    async def _serve(self, request: Request, route: str, body_cls, prepare) -> object:
        """Parse the body as `body_cls`, admit, then run `prepare(body, request_id)` on a gang."""
        rid = _rid(request)
        life = self.admission.open(route, "http")

        async def work():
            body = await _parse(request, body_cls)
            life.admit()
            prepared: Prepared = await prepare(body, rid)  # a chat fetches and decodes its images here
            run = self._runner()
            log.info("request %s: %d prompt(s), stream=%s", rid, len(prepared.requests), prepared.stream)
            if not prepared.stream:
                return JSONResponse(await self.serving.run_full(prepared, run))
            events = await self.serving.start_stream(prepared, run, rid)
            return StreamingResponse(life.hand_on(_carried(events, prepared, life)), media_type="text/event-stream")

        def refuse(exc: Exception):
            if isinstance(exc, BodyTooLarge):  # the guard answers 413
                life.outcome = "client_error"
                raise exc
            return error_response(exc, rid, self.config.retry_after_s)

        try:
            return await life.run(work, refuse)
        except asyncio.CancelledError:
            log.info("request %s: client went away (499); aborted", rid)
            raise

    # -- routes ---------------------------------------------------------------------------------------

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, "/v1/completions", CompletionRequest, self.serving.prepare_completion)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, "/v1/chat/completions", ChatCompletionRequest, self.serving.prepare_chat)

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                            "created": self.created, "owned_by": "maverick",
                                            "root": self.config.model}]}

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        try:
            body = await _parse(request, TokenizeRequest)
            self.serving.check_model(body.model)
            tokenizer = self._need_tokenizer()
            if (body.prompt is None) == (body.messages is None):
                raise InvalidRequest("give exactly one of prompt and messages", param="prompt")
            if body.prompt is not None:
                ids = await off_loop(len(body.prompt), tokenizer.encode, body.prompt, body.add_special_tokens)
            else:  # images count: each becomes its placeholder tokens
                ids, _ = await self.serving.chat_prompt([m.template_message() for m in body.messages],
                                                        [u for m in body.messages for u in m.image_urls()], None,
                                                        check_fit=False,  # counting any text is its job
                                                        add_generation_prompt=body.add_generation_prompt)
            # a long text's ids encoded off the loop: FastAPI's encoder took ~1.5 s of it for 520k ids
            body = await off_loop(len(ids), json.dumps, {"tokens": ids, "count": len(ids)}, separators=(",", ":"))
            return Response(body, media_type="application/json")
        except EngineError as exc:
            return error_response(exc, _rid(request))

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        try:
            body = await _parse(request, DetokenizeRequest)
            self.serving.check_model(body.model)
            tokenizer = self._need_tokenizer()
            bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad} is out of vocabulary", param="tokens")
            return {"prompt": await off_loop(len(body.tokens), tokenizer.decode, body.tokens, False)}
        except EngineError as exc:
            return error_response(exc, _rid(request))

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequest("this server runs with --skip-tokenizer-init: no tokenizer")
        return self.tokenizer

    @api.get("/metrics")
    async def prometheus_metrics(self):
        """This replica's request, token, latency and gang metrics, in Prometheus text format."""
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/health")
    async def health(self):
        return JSONResponse({"status": "ok"})

    @api.get("/health/ready")
    async def health_ready(self, request: Request):
        all_ready = await self.gangs.refresh_all()  # fresh, not the watcher's
        a = self.config.autoscaling
        expected = a.min_gangs if a is not None else self.config.num_gangs  # gangs Serve always runs
        all_ready = all_ready and len(self.gangs.gangs) >= expected
        draining = self.admission.draining
        if draining or not all_ready:
            reason = "draining" if draining else f"gangs ready: {len(self.gangs.ready)}/{len(self.gangs.gangs)}"
            return error_response(Unavailable(f"not ready ({reason})"), _rid(request), self.config.retry_after_s)
        return JSONResponse({"status": "ready", "gangs": len(self.gangs.gangs)})

    # -- control (DeploymentHandle calls from `maverick serve`) ---------------------------------------

    def drain(self) -> int:
        """Refuse new requests from now on (readiness false); returns how many are still in flight."""
        return self.admission.drain()

    def routing_stats(self) -> dict:
        return {**self.gangs.stats(), "resume": dataclasses.asdict(self.resume_stats)}

    def routes(self) -> list[tuple[str, list[str]]]:
        """Every HTTP route this replica serves, as bound at start (tests check auth on each)."""
        def walk(routes, prefix: str):
            for r in routes:
                if hasattr(r, "original_router"):  # a router included into the app (Serve does this)
                    yield from walk(r.original_router.routes, prefix + (getattr(r.include_context, "prefix", "") or ""))
                elif hasattr(r, "path"):
                    yield prefix + r.path, sorted(getattr(r, "methods", None) or [])

        return list(walk(api.routes, ""))
