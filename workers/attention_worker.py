"""The attention worker: an `LLMEngine` whose MoE layers dispatch to expert ranks, stepped by waves.

It holds every non-routed weight (attention, dense MLPs, shared experts, routers, embeddings,
lm_head) and its own KV cache; it never reads routed experts (unless the gang has no expert
workers, when they stay local). Requests arrive through `submit`; each step's outputs for all its
requests leave together through `next_outputs` (one Ray call per step, never per token or layer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import torch

from model.checkpoint import CheckpointReader
from model.config import load_config
from model.decoder import Llama4ForCausalLM
from model.loader import apply_quantization, load_model, materialize, resolve_dtype
from model.optimize import optimize_for_inference
from model.quant import weight_bytes
from model.tokenizer import Tokenizer, load_generation_defaults
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import Unavailable
from workers.expert_parallel import AllToAllExperts, ExpertGroup, Placement
from workers.protocol import GenerateRequest, RequestOutput
from workers.rank import MetricsOptions, Rank
from workers.wave import WaveLoop

log = logging.getLogger(__name__)


class AttentionWorker(Rank):
    def __init__(self, rank: int, num_attention: int, num_experts_ranks: int, model_dir: str,
                 engine_config: EngineConfig, torch_threads: int = 1, idle_steps: int = 3,
                 skip_tokenizer_init: bool = False, metrics: MetricsOptions | None = None,
                 placement: Placement | None = None):
        super().__init__(rank, num_attention + num_experts_ranks, torch_threads, engine_config.device, metrics)
        if num_experts_ranks and placement is None:
            raise ValueError("a gang with expert ranks needs the placement its builder made")
        self.num_attention, self.num_expert_ranks = num_attention, num_experts_ranks
        self.placement = placement  # the gang's one (MoE layer, expert) -> ranks table, made in cluster/gang.py
        self.model_dir, self.engine_config = model_dir, engine_config
        self.idle_steps, self.skip_tokenizer_init = idle_steps, skip_tokenizer_init
        self.engine: LLMEngine | None = None
        self._outbox: list[RequestOutput] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self.comm: ExpertGroup | None = None
        self.step_seconds: list[float] = []  # recent steps with work, for the benchmark
        self.steps_timed = 0  # steps appended to step_seconds since start
        self._steps_exported = 0

    def load_weights(self) -> dict:
        """Build the model without routed experts (they are remote), load its weights, start an engine."""
        start = time.monotonic()
        config = load_config(self.model_dir)
        dtype = resolve_dtype(self.engine_config.dtype, self.device.type)
        with torch.device("meta"):
            model = Llama4ForCausalLM(config)
        if self.num_expert_ranks:
            comm = self.comm = ExpertGroup(self.group, self.rank, self.world_size, config.hidden_size, dtype,
                                           self.device)
            for layer, moe in model.moe_blocks():
                moe.experts = AllToAllExperts(comm, self.placement, layer, self.num_attention)
        apply_quantization(model, self.model_dir)  # an FP8 checkpoint: shared experts, dense MLPs in FP8
        materialize(model, self.device)
        with CheckpointReader(self.model_dir) as reader:
            report = load_model(model, reader, dtype, strict=False, progress=self.progress)
        self.weight_bytes = weight_bytes(model)
        model = optimize_for_inference(model.eval())
        tokenizer = None if self.skip_tokenizer_init else Tokenizer(self.model_dir)
        self.engine = LLMEngine(model, self.engine_config, tokenizer, load_generation_defaults(self.model_dir))
        self.engine.collective = bool(self.num_expert_ranks)
        group = self.group if self.num_expert_ranks else None
        self.wave = WaveLoop(group, self.idle_steps, self.engine.pending_tokens, self._step, f"attention-{self.rank}",
                              self.torch_threads)
        self.wave.on_failure = self._on_failure
        log.info("attention rank %d loaded %.1f MB in %.1fs", self.rank, report.bytes_read / 1e6,
                 time.monotonic() - start)
        return {"rank": self.rank, "bytes_read": report.bytes_read, "seconds": time.monotonic() - start,
                "expert_keys_read": sum(".experts." in k for k in report.keys_read),
                "weight_bytes": self.weight_bytes}

    def start(self) -> None:
        self.wave.start()
        self.start_metrics("attention")

    def publish_metrics(self, metrics) -> None:
        super().publish_metrics(metrics)
        done, window = self.steps_timed, self.step_seconds
        new = min(done - self._steps_exported, len(window))
        self._steps_exported = done
        metrics.engine(self.engine.snapshot, window[len(window) - new:] if new > 0 else [])

    # -- requests (called on the actor's event loop while waves run on their own thread) -----------

    def submit(self, request: GenerateRequest) -> None:
        """Queue a request; a typed `workers.errors` exception travels back to the caller if invalid."""
        self.engine.submit(request)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def next_outputs(self, timeout_s: float = 1.0) -> list[RequestOutput]:
        """Every output produced since the last call; waits up to `timeout_s` for the next step."""
        if self._ready is None:
            self._loop, self._ready = asyncio.get_running_loop(), asyncio.Event()
        if not self._outbox and (self.wave is None or self.wave.failed is None):
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        with self._lock:
            out, self._outbox = self._outbox, []
        return out

    def health(self) -> dict:
        state = self.wave_state()
        if state["failed"]:
            raise Unavailable(f"attention rank {self.rank} failed: {state['failed']}")
        return state

    def stats(self) -> dict:
        """The engine's snapshot of its last step: never the live structures the wave thread mutates."""
        s = self.engine.snapshot
        return {**self.wave_state(), "running": s.num_running, "waiting": s.num_waiting,
                "pending_tokens": s.pending_tokens, "kv": dataclasses.asdict(s.kv),
                "preemptions": s.num_preemptions_total, "blocked_steps": s.num_blocked_steps_total,
                "engine_steps": s.num_steps, "scheduled_tokens": s.scheduled_tokens_total,
                "prompt_tokens": s.prompt_tokens_total, "generation_tokens": s.generation_tokens_total,
                "alltoall_seconds": self.comm.alltoall_seconds if self.comm else 0.0,
                "alltoall_bytes": self.comm.alltoall_bytes if self.comm else 0,
                "weight_bytes": self.weight_bytes,
                "step_seconds": list(self.step_seconds)}

    # -- on the wave thread -------------------------------------------------------------------------

    def _step(self) -> None:
        start, before = time.perf_counter(), self.engine.num_steps
        outputs = self.engine.step()
        if self.engine.num_steps > before:  # a step that computed tokens: keep a window of their times
            self.step_seconds = (self.step_seconds + [time.perf_counter() - start])[-4096:]
            self.steps_timed += 1
        if outputs:
            self._publish(outputs)

    def _on_failure(self, exc: BaseException) -> None:
        self._publish(self.engine.fail_all(Unavailable(f"the gang failed: {exc}")))

    def _publish(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            self._outbox.extend(outputs)
        if self._loop is not None and self._ready is not None:
            self._loop.call_soon_threadsafe(self._ready.set)
