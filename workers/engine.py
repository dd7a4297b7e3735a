"""The engine an attention worker runs: requests in, one continuous-batching step at a time, outputs out.

`submit` and `abort` may be called from any thread; `step` from one driver thread (a local loop,
or the gang's wave thread). A step with nothing to do returns at once.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from model.config import Llama4Config
from model.decoder import Llama4ForCausalLM
from model.loader import load_pretrained, resolve_dtype
from model.tokenizer import GenerationDefaults, Tokenizer, load_generation_defaults
from workers.config import EngineConfig
from workers.detokenizer import IncrementalDetokenizer
from workers.errors import ContextTooLong, EngineError, InternalError, InvalidRequest, Unavailable
from workers.kv_cache import KVCacheManager, plan_num_blocks
from workers.model_runner import ModelRunner
from workers.protocol import Engine, EngineStats, GenerateRequest, RequestOutput, RequestStream, Usage
from workers.request import Request
from workers.scheduler import Scheduler

log = logging.getLogger(__name__)


class LLMEngine(Engine):
    def __init__(self, model: Llama4ForCausalLM, config: EngineConfig, tokenizer: Tokenizer | None = None,
                 defaults: GenerationDefaults | None = None):
        self.model = model
        self.config = config
        self.model_config: Llama4Config = model.config
        self.tokenizer = tokenizer
        self.defaults = defaults or GenerationDefaults(eos_token_ids=list(model.config.eos_token_id))
        self.eos_ids = frozenset(self.defaults.eos_token_ids)
        dtype_bytes = model.lm_head.weight.element_size()
        num_blocks, bytes_per_block = plan_num_blocks(
            self.model_config, config.kv_cache_memory, config.block_size, dtype_bytes, config.max_num_seqs,
            config.max_num_batched_tokens, config.free_chunked_blocks)
        if config.kv_blocks is not None:
            num_blocks = {g: config.kv_blocks[g] for g in num_blocks}
        self.kv = KVCacheManager(self.model_config, num_blocks, config.block_size, bytes_per_block,
                                 config.enable_prefix_caching, config.free_chunked_blocks)
        self.max_model_len = self._resolve_max_model_len()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv, num_blocks)
        self._lock = threading.Lock()
        self._inbox: list[tuple[Request, RequestStream]] = []
        self._aborts: set[str] = set()
        self._live: dict[str, Request] = {}
        self._streams: dict[str, RequestStream] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._failed: str | None = None
        self.num_steps = self.prompt_tokens_total = self.generation_tokens_total = 0
        self.num_preemptions_total = 0
        log.info("KV cache: %s blocks of %d tokens, max_model_len %d", num_blocks, config.block_size,
                 self.max_model_len)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig | None = None,
                       skip_tokenizer_init: bool = False) -> "LLMEngine":
        config = config or EngineConfig()
        torch_dtype = resolve_dtype(config.dtype, config.device)
        model = load_pretrained(model_dir, torch_dtype, config.device)
        tokenizer = None if skip_tokenizer_init else Tokenizer(model_dir)
        return cls(model, config, tokenizer, load_generation_defaults(model_dir))

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        for g, pool in self.kv.pools.items():  # a lone sequence must fit in every group
            if self.kv.max_blocks_needed(g, limit) > pool.num_blocks:
                limit = min(limit, pool.num_blocks * self.config.block_size)
        wanted = self.config.max_model_len
        if wanted is not None and wanted > limit:
            raise ValueError(f"max_model_len {wanted} does not fit: the checkpoint and KV cache "
                             f"({self.config.kv_cache_memory} bytes) allow at most {limit}")
        if limit < 2:
            raise ValueError(f"kv_cache_memory {self.config.kv_cache_memory} bytes is too small for one sequence")
        return wanted or limit

    # -- the protocol -------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> RequestStream:
        if self._failed:
            raise Unavailable(f"engine failed: {self._failed}")
        req = self._validate(request)
        stream = RequestStream(request.request_id)
        with self._lock:
            if request.request_id in self._streams or any(r.request_id == request.request_id for r, _ in self._inbox):
                raise InvalidRequest(f"request id {request.request_id!r} is already in use", param="request_id")
            self._inbox.append((req, stream))
        return stream

    def _validate(self, request: GenerateRequest) -> Request:
        ids, params, vocab = request.prompt_token_ids, request.params, self.model_config.vocab_size
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of vocabulary [0, {vocab})", param="prompt")
        params.validate(vocab)
        limit, n = self.max_model_len, len(ids)
        if params.max_tokens is None:
            if n >= limit:
                raise ContextTooLong(f"This model's maximum context length is {limit} tokens. However, your "
                                     f"prompt has {n} tokens, leaving none to generate.", param="prompt")
            max_tokens = limit - n
        else:
            max_tokens = params.max_tokens
            if n + max_tokens > limit:
                raise ContextTooLong(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion).",
                    param="max_tokens")
        return Request(request.request_id, list(ids), params, max_tokens)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts) or self.scheduler.num_unfinished > 0

    def pending_tokens(self) -> int:
        with self._lock:
            inbox = sum(len(r.tokens) for r, _ in self._inbox)
        return inbox + self.scheduler.pending_tokens()

    def health(self) -> None:
        if self._failed:
            raise Unavailable(f"engine failed: {self._failed}")

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.num_steps,
                           self.prompt_tokens_total, self.generation_tokens_total,
                           self.num_preemptions_total, self.kv.stats())

    def step(self) -> list[RequestOutput]:
        outputs = self._take_inbox()
        if self.scheduler.num_unfinished == 0:
            return self._deliver(outputs)
        batch = self.scheduler.schedule()
        self.num_preemptions_total += len(batch.preempted)
        if not batch.requests:
            return self._deliver(outputs)
        sample = [req.num_computed + n == len(req.tokens) for req, n in zip(batch.requests, batch.num_tokens)]
        try:
            logits = self.runner.execute(batch, sample)
        except Exception as exc:  # a bug or a broken device: fail this step's requests, keep serving
            log.exception("engine step failed")
            for req in batch.requests:
                outputs.append(self._finish(req, "error", error=InternalError("the engine failed on this request")))
            return self._deliver(outputs)
        self.num_steps += 1
        tokens = logits.argmax(dim=-1).tolist()
        row = 0
        for req, n, samples in zip(batch.requests, batch.num_tokens, sample):
            req.computed(n)
            self.kv.after_step(req)
            if not samples:
                continue
            token = tokens[row]
            row += 1
            req.append_token(token)
            self.generation_tokens_total += 1
            outputs.append(self._token_output(req, token))
        return self._deliver(outputs)

    # -- helpers ------------------------------------------------------------------------------------

    def _take_inbox(self) -> list[RequestOutput]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for req, stream in inbox:
            self._live[req.request_id] = req
            self._streams[req.request_id] = stream
            if self.tokenizer is not None:
                self._detok[req.request_id] = IncrementalDetokenizer(self.tokenizer)
            self.prompt_tokens_total += req.num_prompt_tokens
            self.scheduler.add(req)
        return [self._finish(self._live[rid], "abort") for rid in aborts if rid in self._live]

    def _token_output(self, req: Request, token: int) -> RequestOutput:
        detok = self._detok.get(req.request_id)
        delta = detok.add([token]) if detok else None
        params = req.params
        if token in self.eos_ids and not params.ignore_eos:
            return self._finish(req, "stop", [token], delta)
        if token in params.stop_token_ids:
            return self._finish(req, "stop", [token], delta, stop_reason=token)
        if len(req.output_token_ids) >= req.max_tokens or len(req.tokens) >= self.max_model_len:
            return self._finish(req, "length", [token], delta)
        return RequestOutput(req.request_id, [token], delta)

    def _finish(self, req: Request, reason: str, new_ids: list[int] | None = None, delta: str | None = None,
                stop_reason: int | str | None = None, error: EngineError | None = None) -> RequestOutput:
        del self._live[req.request_id]
        detok = self._detok.pop(req.request_id, None)
        if detok is not None:
            delta = (delta or "") + detok.flush()
        req.finish(reason, stop_reason)
        self.scheduler.remove(req)
        usage = Usage(req.num_prompt_tokens, len(req.output_token_ids), req.num_cached_prompt)
        return RequestOutput(req.request_id, new_ids or [], delta, reason, stop_reason, usage, error)

    def _deliver(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                entry.put(out)
                if out.finished:
                    del self._streams[out.request_id]
        return outputs
