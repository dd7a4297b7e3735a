"""The engine an attention worker runs: requests in, one continuous-batching step at a time, outputs out.

`submit` and `abort` may be called from any thread; `step` (or, in a gang, `plan` then `run` with the
micro-batch count the ranks agreed in between) from one driver thread: a local loop, or the gang's
wave thread. A step with nothing to do returns at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import Llama4Config
from model.decoder import Llama4ForCausalLM
from model.loader import load_pretrained, load_vision_tower, resolve_dtype
from model.optimize import optimize_for_inference
from model.tokenizer import GenerationDefaults, Tokenizer, load_generation_defaults
from model.vision import VisionTower
from workers.config import EngineConfig
from workers.errors import ContextTooLong, InternalError, InvalidRequest, Unavailable
from workers.kv_cache import KVCacheManager, plan_num_blocks
from workers.model_runner import ModelRunner
from workers.outputs import OutputProcessor
from workers.protocol import Engine, EngineStats, GenerateRequest, RequestOutput
from workers.request import Request
from workers.sampler import sample, token_logprob
from workers.scheduler import ScheduledBatch, Scheduler
from workers.structured import Grammars

log = logging.getLogger(__name__)


@dataclass
class PlannedStep:
    """A step scheduled and not yet computed."""
    outputs: list[RequestOutput]  # taken from the inbox (aborts)
    batch: ScheduledBatch | None  # None: no tokens on this rank
    parts: list[tuple[int, int]]  # its micro-batches, as ranges of batch.requests
    routed_rows: list[int]  # rows each micro-batch sends to the routed experts

    def proposal(self) -> list[int]:
        """What this rank asks of the gang's step: [capacity T, micro-batches M] (`workers.wave`)."""
        return [max(self.routed_rows, default=0), len(self.parts)]


class LLMEngine(Engine):
    def __init__(self, model: Llama4ForCausalLM, config: EngineConfig, tokenizer: Tokenizer | None = None,
                 defaults: GenerationDefaults | None = None, vision: VisionTower | None = None):
        self.model = model
        self.vision = vision
        self.config = config
        self.model_config: Llama4Config = model.config
        self.tokenizer = tokenizer
        self.defaults = defaults or GenerationDefaults(eos_token_ids=list(model.config.eos_token_id))
        dtype_bytes = torch.finfo(model.model.embed_tokens.weight.dtype).bits // 8
        num_blocks, bytes_per_block = plan_num_blocks(
            self.model_config, config.kv_cache_memory, config.block_size, dtype_bytes, config.max_num_seqs,
            config.max_num_batched_tokens, config.free_chunked_blocks)
        if config.kv_blocks is not None:
            num_blocks = {g: config.kv_blocks[g] for g in num_blocks}
        self.kv = KVCacheManager(self.model_config, num_blocks, config.block_size, bytes_per_block,
                                 config.enable_prefix_caching, config.free_chunked_blocks)
        self.max_model_len = self._resolve_max_model_len()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv, num_blocks, vision, config.microbatches, config.microbatch_min_tokens)
        self.outputs = OutputProcessor(tokenizer, frozenset(self.defaults.eos_token_ids), self.max_model_len)
        self.generator = torch.Generator(device=self.runner.device)
        self.generator.seed()
        self.grammars = (Grammars.for_tokenizer(tokenizer, self.model_config.vocab_size,
                                                list(self.defaults.eos_token_ids or self.model_config.eos_token_id))
                         if tokenizer is not None else None)
        # called (from the grammar thread) when a request's grammar has compiled: its driver's wake-up
        self.on_work: Callable[[], None] | None = None
        self._lock = threading.Lock()
        # (request id, its choices, their grammar matchers being compiled or None), not yet scheduled
        self._inbox: list[tuple[str, list[Request], Future | None]] = []
        self._aborts: set[str] = set()
        self._live: dict[str, list[Request]] = {}  # parent id -> its choices
        self._failed: str | None = None
        # in a gang every step is collective: a step with nothing to compute still runs the model
        # with zero tokens, so this rank's MoE layers take part in the all-to-alls
        self.collective = False
        self.num_steps = self.prompt_tokens_total = self.generation_tokens_total = 0
        self.num_preemptions_total = 0
        # a step that scheduled nothing while requests wait: counted, logged once, and the engine
        # reports no pending work until something changes (a new request, an abort)
        self.num_blocked_steps_total = 0
        self._blocked = False
        self.scheduled_tokens_total = 0
        self.snapshot = self.stats()  # frozen view for other threads: replaced after every step
        log.info("KV cache: %s blocks of %d tokens, max_model_len %d", num_blocks, config.block_size,
                 self.max_model_len)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig | None = None,
                       skip_tokenizer_init: bool = False) -> "LLMEngine":
        config = config or EngineConfig()
        torch_dtype = resolve_dtype(config.dtype, config.device)
        model = optimize_for_inference(load_pretrained(model_dir, torch_dtype, config.device))
        tokenizer = None if skip_tokenizer_init else Tokenizer(model_dir)
        vision = load_vision_tower(model_dir, torch_dtype, config.device)
        return cls(model, config, tokenizer, load_generation_defaults(model_dir), vision)

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        self._limit_reason = "the checkpoint's max_position_embeddings"
        for g, pool in self.kv.pools.items():  # a lone sequence must fit in every group
            if self.kv.max_blocks_needed(g, limit) > pool.num_blocks:
                limit = min(limit, pool.num_blocks * self.config.block_size)
                self._limit_reason = (f"the KV cache: {pool.num_blocks} {g} blocks of {self.config.block_size} "
                                      f"tokens hold one sequence of at most {limit} tokens")
        wanted = self.config.max_model_len
        if wanted is not None and wanted > limit:
            raise ValueError(f"max_model_len {wanted} does not fit: the checkpoint and KV cache "
                             f"({self.config.kv_cache_memory} bytes) allow at most {limit}")
        if limit < 2:
            raise ValueError(f"kv_cache_memory {self.config.kv_cache_memory} bytes is too small for one sequence")
        return wanted or limit

    # -- the protocol -------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> None:
        if self._failed:
            raise Unavailable(f"engine failed: {self._failed}")
        choices = self._validate(request)
        rid = request.request_id
        with self._lock:
            if rid in self._live or any(queued == rid for queued, _, _ in self._inbox):
                raise InvalidRequest(f"request id {rid!r} is already in use", param="request_id")
            grammar = None
            if choices[0].params.structured is not None:  # compiled off this thread; queued meanwhile
                grammar = self.grammars.matchers(choices[0].params.structured,
                                                 [r.output_token_ids for r in choices])
            self._inbox.append((rid, choices, grammar))
        if grammar is not None:
            grammar.add_done_callback(lambda _: self.on_work and self.on_work())

    def _validate(self, request: GenerateRequest) -> list[Request]:
        ids, vocab = request.prompt_token_ids, self.model_config.vocab_size
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        request.params.validate(vocab)
        params = request.params.resolve(self.defaults.sampling)
        params.validate(vocab)
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer; this server works on token ids only", param="stop")
        if params.structured is not None and self.grammars is None:
            raise InvalidRequest("structured outputs need a tokenizer; this server works on token ids only",
                                 param=params.structured.param)
        ContextTooLong.check(self.max_model_len, self._limit_reason, len(ids), params.max_tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        # after the length checks: this pass over every id is the costly one (~0.2 s per 1M tokens)
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of vocabulary [0, {vocab})", param="prompt")
        resume = self._validate_resume(request.resume, params.n, vocab, max_tokens)
        images = list(request.images or [])
        positions, spans = self._validate_images(ids, images)
        choices = []
        for i in (range(params.n) if resume is None else sorted(resume)):
            rid = request.request_id if params.n == 1 else f"{request.request_id}#{i}"
            gen = torch.Generator(device=self.runner.device) if params.seed is not None else None
            done = list(resume[i]) if resume is not None else []
            choices.append(Request(rid, list(ids), params, max_tokens, output_token_ids=done,
                                   parent_id=request.request_id, index=i,
                                   first_sibling=choices[0] if choices else None, generator=gen,
                                   images=images, patch_positions=positions, image_spans=spans))
        return choices

    def _validate_images(self, ids: list[int], images: list) -> tuple[list[int], list[tuple[int, int, bytes]]]:
        """Each image's `<|patch|>` positions in the prompt: one per feature vector its tiles become."""
        if self.vision is None:
            if images:
                raise InvalidRequest("this model has no vision tower: images are not supported", param="messages")
            return [], []
        if not images:  # `<|patch|>` without images is an ordinary token, as transformers takes it
            return [], []
        c = self.vision.config
        positions = [i for i, t in enumerate(ids) if t == c.image_token_index]
        shape = (c.num_channels, c.image_size, c.image_size)
        if any(tuple(im.pixel_values.shape[1:]) != shape for im in images):
            raise InvalidRequest(f"image tiles must be {shape}", param="messages")
        counts = [im.num_tiles * c.tokens_per_tile for im in images]
        if len(positions) != sum(counts):
            raise InvalidRequest(f"the prompt has {len(positions)} image patch tokens where its {len(images)} "
                                 f"images need {sum(counts)}", param="prompt")
        spans, start = [], 0
        for im, count in zip(images, counts):
            spans.append((positions[start], positions[start + count - 1] + 1, im.digest))
            start += count
        return positions, spans

    @staticmethod
    def _validate_resume(resume: dict[int, list[int]] | None, n: int, vocab: int,
                         max_tokens: int) -> dict[int, list[int]] | None:
        """A resumed request's open choices: known indices, tokens in vocabulary, budget left."""
        if resume is None:
            return None
        if not resume or any(not isinstance(i, int) or not 0 <= i < n for i in resume):
            raise InvalidRequest(f"resume must name open choices among 0..{n - 1}", param="resume")
        for tokens in resume.values():
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
                raise InvalidRequest("a resumed choice holds a token out of vocabulary", param="resume")
            if len(tokens) >= max_tokens:
                raise InvalidRequest("a resumed choice has no tokens left to generate", param="resume")
        return resume

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        """Pending tokens, or requests whose grammar still compiles (an offline driver keeps stepping)."""
        if self.pending_tokens() > 0:
            return True
        with self._lock:
            return any(grammar is not None for _, _, grammar in self._inbox)

    def pending_tokens(self) -> int:
        """Tokens a step would compute (plus one per queued abort); 0 while blocked and unchanged."""
        with self._lock:  # requests whose grammar still compiles wait for `on_work`
            inbox = sum(len(r.tokens) for _, choices, grammar in self._inbox for r in choices
                        if grammar is None or grammar.done()) + len(self._aborts)
        if self._blocked and not inbox:
            return 0
        return inbox + self.scheduler.pending_tokens()

    @property
    def blocked(self) -> bool:
        """Requests wait but no step can run any of them until a request arrives or is aborted."""
        return self._blocked

    def health(self) -> None:
        if self._failed:
            raise Unavailable(f"engine failed: {self._failed}")

    def stats(self) -> EngineStats:
        """Counters read on the stepping thread; other threads read `snapshot` instead."""
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.num_steps,
                           self.prompt_tokens_total, self.generation_tokens_total,
                           self.num_preemptions_total, self.kv.stats(), self.num_blocked_steps_total,
                           self.scheduled_tokens_total, self.scheduler.pending_tokens(),
                           self.runner.microbatched_steps)

    def step(self) -> list[RequestOutput]:
        """One step on its own: plan it and run all of its micro-batches (no gang to agree with). With
        nothing to run but grammars compiling, it first waits a moment for one, rather than let its
        driver spin against the compile thread."""
        if not self.pending_tokens():
            with self._lock:
                compiling = [grammar for _, _, grammar in self._inbox if grammar is not None]
            if compiling:
                futures.wait(compiling, timeout=0.05, return_when=futures.FIRST_COMPLETED)
        planned = self.plan()
        return self.run(planned, len(planned.parts))

    def plan(self) -> PlannedStep:
        """Take the inbox and schedule the next batch; nothing is computed yet. In a gang the ranks
        agree on the returned plan's `proposal` before every one of them calls `run`."""
        outputs = self._take_inbox()
        batch = self.scheduler.schedule() if self.scheduler.num_unfinished else None
        self._note_blocked(batch is not None and not batch.requests and not outputs)
        if batch is not None:
            self.num_preemptions_total += len(batch.preempted)
            if self.config.check_invariants:
                self.kv.check_invariants(self.scheduler.running)
        if batch is None or not batch.requests:
            return PlannedStep(outputs, None, [], [])
        parts = self.runner.split(batch)
        top_k = self.model.config.num_experts_per_tok
        return PlannedStep(outputs, batch, parts, [sum(batch.num_tokens[a:b]) * top_k for a, b in parts])

    def run(self, planned: PlannedStep, microbatches: int) -> list[RequestOutput]:
        """Compute a planned step as `microbatches` micro-batches (at least its own parts; 0 when no rank
        of the gang has tokens: only the outputs go out), then deliver its outputs."""
        try:
            outputs, batch = planned.outputs, planned.batch
            if batch is None:
                if microbatches:  # the gang computes: join its collectives with no tokens
                    self.runner.execute_empty(microbatches)
                return self._deliver(outputs)
            try:
                outputs += self._run(batch, planned.parts, microbatches)
            except Exception:
                if self.collective:  # a failed collective breaks the gang, not just these requests
                    raise
                log.exception("engine step failed")  # a bug or a broken device: fail this step's requests
                for req in batch.requests:
                    if not req.state.done:
                        outputs.append(self._finish(req, "error", error=InternalError("the engine failed")))
            return self._deliver(outputs)
        finally:
            self.snapshot = self.stats()

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """The gang failed: end every live request with `error` and refuse new ones."""
        self._failed = str(error)
        outputs = self._take_inbox()
        for choices in list(self._live.values()):
            for req in choices:
                if not req.state.done:
                    outputs.append(self._finish(req, "error", error=error))
        return self._deliver(outputs)

    # -- helpers ------------------------------------------------------------------------------------

    def _note_blocked(self, blocked: bool) -> None:
        if blocked:
            self.num_blocked_steps_total += 1
            if not self._blocked:  # once per episode, not once per step
                log.error("engine blocked: %d requests wait and none can be scheduled; %s",
                          self.scheduler.num_unfinished, self.kv.describe())
        self._blocked = blocked

    def _run(self, batch: ScheduledBatch, parts: list[tuple[int, int]], microbatches: int) -> list[RequestOutput]:
        sampling = [req.num_computed + n == len(req.tokens) for req, n in zip(batch.requests, batch.num_tokens)]
        if self.grammars is not None:  # their masks fill while the forward pass runs
            self.grammars.prefetch([req.matcher for req, s in zip(batch.requests, sampling)
                                    if s and req.matcher is not None])
        hidden_TD, rows = self.runner.execute(batch, parts, microbatches)
        self.num_steps += 1
        self.scheduled_tokens_total += batch.total_tokens
        self._prompt_logprobs(batch, hidden_TD, rows)
        samplers = [req for req, s in zip(batch.requests, sampling) if s]
        last_rows = [end - 1 for (_, end), s in zip(rows, sampling) if s]
        tokens, logprobs = [], []
        if samplers:
            logits = self.runner.logits(hidden_TD, last_rows)
            tokens, logprobs = sample(logits, samplers, self.generator, self.grammars)
        for req, n in zip(batch.requests, batch.num_tokens):
            req.computed(n)
            self.kv.after_step(req)
        if self.config.check_invariants:
            self.kv.check_invariants(self.scheduler.running)
        outputs = []
        for req, token, logprob in zip(samplers, tokens, logprobs):
            self.generation_tokens_total += 1
            if req.matcher is not None:
                try:
                    req.matcher.advance(token)
                except RuntimeError:
                    log.exception("request %s: grammar state lost", req.request_id)
                    req.append_token(token)
                    outputs.append(self._finish(req, "error", error=InternalError("the output grammar failed")))
                    continue
            out = self.outputs.token(req, token, logprob)
            if out.finished:
                self.scheduler.remove(req)
            outputs.append(out)
        return outputs

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden_TD: torch.Tensor, rows: list[tuple[int, int]]) -> None:
        """Logprob of each prompt token given the ones before it, for the requests that asked."""
        for req, (start, end) in zip(batch.requests, rows):
            k = req.params.prompt_logprobs
            first = req.num_computed  # row r predicts the token at position first + r + 1
            if k is None or first + 1 >= req.num_prompt_tokens or len(req.prompt_logprobs) > first:
                continue
            last = min(end - start, req.num_prompt_tokens - 1 - first)
            logp = torch.log_softmax(self.runner.logits(hidden_TD, list(range(start, start + last))), -1)
            for r in range(last):
                req.prompt_logprobs.append(token_logprob(logp[r], req.tokens[first + r + 1], k))

    def _take_inbox(self) -> list[RequestOutput]:
        """Queue what arrived (requests whose grammar still compiles stay, unless aborted) and end the
        aborted and those whose grammar failed."""
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            inbox = [e for e in self._inbox if e[2] is None or e[2].done() or e[0] in aborts]
            self._inbox = [e for e in self._inbox if e not in inbox]
        failed = []
        for rid, choices, grammar in inbox:
            self._live[rid] = choices
            self.prompt_tokens_total += choices[0].num_prompt_tokens
            error = None
            if grammar is not None and grammar.done():
                error = grammar.exception()
                if error is None:
                    for req, matcher in zip(choices, grammar.result()):
                        req.matcher = matcher
            for req in choices:
                self.outputs.track(req)
                if error is not None:
                    failed.append(self._finish(req, "error", error=_grammar_error(error)))
                elif rid not in aborts:
                    self.scheduler.add(req)
        return failed + [self._finish(req, "abort") for rid in aborts for req in self._live.get(rid, ())
                         if not req.state.done]

    def _finish(self, req: Request, reason: str, **kw) -> RequestOutput:
        out = self.outputs.finish(req, reason, **kw)
        self.scheduler.remove(req)
        return out

    def _deliver(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The step's outputs, the only channel they leave by; a request whose choices all finished is
        forgotten (its id may then be used again)."""
        for out in outputs:
            choices = self._live.get(out.request_id)
            if out.finished and choices is not None and all(r.state.done for r in choices):
                del self._live[out.request_id]
        return outputs


def _grammar_error(exc: BaseException) -> Exception:
    """A compile failure as the client's error: the spec's own InvalidRequest, else an internal error."""
    if isinstance(exc, InvalidRequest):
        return exc
    log.error("grammar compile failed: %r", exc)
    return InternalError("the output grammar could not be built")
