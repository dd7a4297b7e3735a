"""The ingress deployment: the OpenAI-compatible HTTP app (and, mixed in, the gRPC service) in front of
the gangs.

It validates and tokenizes, admits (beyond `max_pending_requests` in flight: 429 + Retry-After),
picks a ready gang (prefix affinity balanced against load) and streams from that gang's attention
workers directly through a `GangClient` (the gang replica only builds and watches its gang, and tells
this replica its attention workers' handles), and maps every error through the one table in
`router.errors`. Admission and routing are per ingress replica. Readiness is true only when every
gang has produced a token and the ingress is not draining; draining turns new requests away with 503
while in-flight ones finish.
"""


import asyncio
import dataclasses
import functools
import json
import logging
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, StreamingResponse

from cluster import routing
from cluster.config import AppConfig
from cluster.gang_client import GangClient
from cluster.probe import every
from model.images import ImageProcessor
from model.tokenizer import Tokenizer, load_generation_defaults
from router.errors import HTTPError, error_response
from router.grpc_service import GenerationService
from router.http_guard import BodyTooLarge, Guard, GuardSettings
from router.images import ImageLoader
from router.metrics import RequestMetrics, Ticket, outcome_of
from router.openai_models import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from router.resume import NoReadyGang, ResumeStats, resumable
from router.serving import Prepared, Serving, off_loop
from workers.errors import EngineError, InvalidRequest, QueueFull, Unavailable
from workers.protocol import GenerateRequest

log = logging.getLogger(__name__)
STATUS_TIMEOUT_S = 5.0  # beyond a long-poll's own wait
STATUS_WAIT_S = 10.0  # a gang's status long-poll answers at a change, else after this
STATUS_RETRY_S = 0.5  # between long-polls (a change meanwhile is answered at once)
STATUS_MISSES_ALLOWED = 3  # polls in a row a gang may miss before it counts as not ready
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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


@serve.deployment
@serve.ingress(api)
class Ingress(GenerationService):
    async def __init__(self, args: dict, gangs: list):
        self.config = config = AppConfig.model_validate(args).with_api_key_from_env()
        self.gangs = gangs
        self.gang_clients: list[GangClient | None] = [None] * len(gangs)  # for each gang's epoch now serving
        self.consumer = f"ingress-{serve.get_replica_context().replica_tag}-{uuid.uuid4().hex[:8]}"
        self.gang_load = [0] * len(gangs)
        self.gang_ready = [False] * len(gangs)
        self.gang_requests = [0] * len(gangs)  # engine requests sent to each gang since start
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(config.model)
        images = ImageLoader(ImageProcessor.from_model_dir(config.model), config.images) if self.tokenizer else None
        eos = load_generation_defaults(config.model).eos_token_ids if self.tokenizer else []
        self.serving = Serving(config.model_name, self.tokenizer, config.request_timeout_s, images, eos)
        self.in_flight = 0
        self.draining = False
        self.created = int(time.time())
        self.metrics = RequestMetrics(config.model_name, config.metrics.enabled)
        self.gang_status: list[dict | None] = [None] * len(gangs)
        self.status_misses = [0] * len(gangs)  # status polls in a row that timed out
        self.failed_epoch: list[int | None] = [None] * len(gangs)  # seen failing: not ready until rebuilt
        self.channel_failures = [0] * len(gangs)  # channels that failed here, the gang alive: dialed again
        self.resume_stats = ResumeStats()
        api.state.guard = GuardSettings(config.api_key, config.max_body_bytes, self.metrics)
        self._watch = asyncio.create_task(self._watch_gangs())

    # -- gangs ----------------------------------------------------------------------------------------

    async def _watch_gangs(self) -> None:
        """Keep each gang's readiness fresh, so requests skip a failed or rebuilding gang: one long-poll
        per gang, answered at a change of state or after `STATUS_WAIT_S`. A round that fails is logged
        and the next one runs (a dead watcher would freeze readiness)."""
        await asyncio.gather(*(every(STATUS_RETRY_S, functools.partial(self._refresh_gang, i, STATUS_WAIT_S),
                                     f"gang {i}'s status watcher") for i in range(len(self.gangs))))

    async def _refresh_gang(self, i: int, wait_s: float) -> None:
        """Gang i's status once it differs from the one known here (at once if `wait_s` is 0)."""
        known = self.gang_status[i] if wait_s else None
        try:
            self.gang_status[i] = await asyncio.wait_for(self.gangs[i].watch_status.remote(known, wait_s),
                                                         wait_s + STATUS_TIMEOUT_S)
            self.status_misses[i] = 0
        except asyncio.TimeoutError:  # a busy replica on loaded cores misses a poll; a hung one all of them
            self.status_misses[i] += 1
            if self.status_misses[i] == STATUS_MISSES_ALLOWED:
                log.warning("gang %d: %d status polls in a row timed out; not ready until it answers", i,
                            STATUS_MISSES_ALLOWED)
            if self.status_misses[i] >= STATUS_MISSES_ALLOWED:
                self.gang_status[i] = None
        except Exception as exc:  # the replica is gone: not ready at once
            if self.gang_status[i] is not None:  # said once per outage, not at every retry
                log.warning("gang %d: its status failed (%s: %s); not ready until it answers", i,
                            type(exc).__name__, exc)
            self.gang_status[i] = None
        client, status = self.gang_clients[i], self.gang_status[i]
        self.gang_ready[i] = bool(status and status["ready"] and status.get("epoch") != self.failed_epoch[i])
        # a new epoch proves the old gang gone; a status that timed out proves nothing (a busy replica)
        if client is not None and (client.broken or (status is not None and status.get("epoch") != client.epoch)):
            self.gang_clients[i] = None
            client.close("the gang was rebuilt")
        self.metrics.gangs(self.gang_status, self.gang_load)

    def _gang_broke(self, gang: int, epoch: int, gang_failed: bool) -> None:
        """A client of this gang saw it fail: no request goes there until a status shows a new epoch. A
        channel that failed in this replica, the gang alive, is dialed again by the next request."""
        if not gang_failed:
            self.channel_failures[gang] += 1
            return
        self.failed_epoch[gang] = epoch
        status = self.gang_status[gang]
        if status is None or status.get("epoch") == epoch:
            self.gang_ready[gang] = False

    def _pick_gang(self, prompt_token_ids: list[int]) -> int:
        ready = [i for i, ok in enumerate(self.gang_ready) if ok]
        if not ready:
            raise NoReadyGang("no gang can take requests now (starting, failed or rebuilding); retry")
        return routing.pick(routing.affinity_key(prompt_token_ids), self.gang_load, ready)

    async def _wait_for_gang(self, prompt_token_ids: list[int]) -> int:
        """A ready gang for a request moving off a failed one; the request's deadline bounds the wait."""
        while True:
            try:
                return self._pick_gang(prompt_token_ids)
            except NoReadyGang:
                await asyncio.sleep(0.1)

    async def _client(self, gang: int) -> GangClient:
        """This replica's client of the gang's epoch now serving: made on first use after a (re)build."""
        client = self.gang_clients[gang]
        if client is None or client.broken:
            try:
                epoch, attention = await self.gangs[gang].attention.remote()
            except Exception as exc:  # rebuilding, or the replica is gone
                cause = getattr(exc, "cause", None)
                raise cause if isinstance(cause, Unavailable) else Unavailable(f"gang {gang} is unreachable") from None
            if epoch == self.failed_epoch[gang]:  # its supervisor has not noticed the failure yet
                raise Unavailable(f"gang {gang} is failing")
            client = self.gang_clients[gang]
            if client is None or client.broken or client.epoch != epoch:  # another request may have made it
                client = self.gang_clients[gang] = GangClient(
                    attention, self.consumer, epoch=epoch,
                    on_broken=lambda _reason, gang_failed: self._gang_broke(gang, epoch, gang_failed))
        return client

    def _runner(self):
        """A function streaming one engine request's output batches, from the gang it picks and, when
        that gang fails, from the next (`router.resume`)."""

        async def run(request: GenerateRequest):
            clock = self.metrics.engine_request(len(request.prompt_token_ids))
            limit = self.config.migration_limit
            batches = (resumable(request, self._attempt, limit, self.resume_stats) if limit
                       else self._attempt(request, False))  # no moves: no bookkeeping either
            try:
                async for batch in batches:
                    clock.outputs(batch)
                    yield batch
            finally:  # timed out, failed or abandoned: its `finally` aborts it in the engine now
                await batches.aclose()

        return run

    async def _attempt(self, request: GenerateRequest, retry: bool):
        """One try of a request on one gang; a retry waits for a ready one."""
        prompt = request.prompt_token_ids
        gang = await self._wait_for_gang(prompt) if retry else self._pick_gang(prompt)
        self.gang_load[gang] += 1
        self.gang_requests[gang] += 1
        try:
            batches = (await self._client(gang)).generate_batches(request)
            try:
                async for batch in batches:
                    yield batch
            finally:
                await batches.aclose()
        finally:
            self.gang_load[gang] -= 1

    # -- admission ------------------------------------------------------------------------------------

    def _ticket(self, route: str, protocol: str) -> Ticket:
        """Counted as received now; `close(outcome)` on every path counts the outcome and releases it."""
        return self.metrics.ticket(route, protocol, self._release)

    def _admit(self, ticket: Ticket) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.in_flight >= self.config.max_pending_requests:
            raise QueueFull(f"too many requests in flight ({self.in_flight}); retry later")
        self.in_flight += 1
        ticket.admitted = True
        self.metrics.set_in_flight(self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        self.metrics.set_in_flight(self.in_flight)

    async def _serve(self, request: Request, route: str, body_cls, prepare) -> object:
        """Parse the body as `body_cls`, admit, then run `prepare(body, request_id)` on a gang."""
        rid = _rid(request)
        ticket = self._ticket(route, "http")
        outcome = "server_error"  # unless a path below says otherwise
        try:
            body = await _parse(request, body_cls)
            self._admit(ticket)
            prepared: Prepared = await prepare(body, rid)  # a chat fetches and decodes its images here
            run = self._runner()
            log.info("request %s: %d prompt(s), stream=%s", rid, len(prepared.requests), prepared.stream)
            if not prepared.stream:
                response = JSONResponse(await self.serving.run_full(prepared, run))
                outcome = "ok"
                return response
            events = await self.serving.start_stream(prepared, run, rid)
            outcome = None  # the stream's end decides
            body = self._close_after(events, prepared, ticket)
            # a client gone before the first byte: the body never starts, so no finally of its runs
            weakref.finalize(body, ticket.close, "aborted")
            return StreamingResponse(body, media_type="text/event-stream")
        except asyncio.CancelledError:
            log.info("request %s: client went away (499); aborted", rid)
            outcome = "aborted"
            raise
        except BodyTooLarge:  # the guard answers 413
            outcome = "client_error"
            raise
        except Exception as exc:
            outcome = outcome_of(exc)
            return error_response(exc, rid, self.config.retry_after_s)
        finally:
            if outcome is not None:
                ticket.close(outcome)

    async def _close_after(self, events, prepared: Prepared, ticket: Ticket):
        outcome = "aborted"  # the client went away mid-stream, unless the stream ends
        try:
            async for event in events:
                yield event
            outcome = outcome_of(prepared.stream_error)
        finally:
            ticket.close(outcome)

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
                                                        [u for m in body.messages for u in m.image_urls()],
                                                        add_generation_prompt=body.add_generation_prompt)
            return {"tokens": ids, "count": len(ids)}
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
        await asyncio.gather(*(self._refresh_gang(i, 0.0) for i in range(len(self.gangs))))  # fresh, not cached
        if self.draining or not all(self.gang_ready):
            reason = "draining" if self.draining else f"gangs ready: {sum(self.gang_ready)}/{len(self.gangs)}"
            return error_response(Unavailable(f"not ready ({reason})"), _rid(request), self.config.retry_after_s)
        return JSONResponse({"status": "ready", "gangs": len(self.gangs)})

    # -- control (DeploymentHandle calls from `maverick serve`) ---------------------------------------

    def drain(self) -> int:
        """Refuse new requests from now on (readiness false); returns how many are still in flight."""
        self.draining = True
        return self.in_flight

    def routing_stats(self) -> dict:
        return {"ready": list(self.gang_ready), "in_flight": list(self.gang_load),
                "requests": list(self.gang_requests), "channel_failures": list(self.channel_failures),
                "consumer": self.consumer,
                "resume": dataclasses.asdict(self.resume_stats)}

    def routes(self) -> list[tuple[str, list[str]]]:
        """Every HTTP route this replica serves, as bound at start (tests check auth on each)."""
        def walk(routes, prefix: str):
            for r in routes:
                if hasattr(r, "original_router"):  # a router included into the app (Serve does this)
                    yield from walk(r.original_router.routes, prefix + (getattr(r.include_context, "prefix", "") or ""))
                elif hasattr(r, "path"):
                    yield prefix + r.path, sorted(getattr(r, "methods", None) or [])

        return list(walk(api.routes, ""))
