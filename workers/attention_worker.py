"""The attention worker: an `LLMEngine` whose MoE layers dispatch to expert ranks, stepped by waves.

It holds every non-routed weight (attention, dense MLPs, shared experts, routers, embeddings,
lm_head) and its own KV cache; it never reads routed experts (unless the gang has no expert
workers, when they stay local). Requests arrive through `submit(request, consumer)`; each consumer
(an ingress replica, the gang supervisor) holds one streaming call to `outputs(consumer)`, and a
step's outputs of all its requests reach it as one item of that stream: one message per step and
consumer, pushed, never one per request, token or layer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import torch

from model.checkpoint import CheckpointReader
from model.config import load_config
from model.decoder import Llama4ForCausalLM
from model.loader import apply_quantization, load_model, load_vision_tower, materialize, resolve_dtype
from model.optimize import optimize_for_inference
from model.quant import weight_bytes
from model.tokenizer import Tokenizer, load_generation_defaults
from workers.config import EngineConfig, EplbSettings
from workers.engine import LLMEngine, PlannedStep
from workers.eplb import Rebalancer
from workers.errors import Draining, RankLeaving, Unavailable
from workers.expert_parallel import ExpertGroup, Placement, shard_experts
from workers.protocol import GenerateRequest, RequestOutput
from workers.rank import MetricsOptions, Rank
from workers.wave import WaveLoop

log = logging.getLogger(__name__)
CONFIRM_S = 5.0  # a drain waits this long at most for the consumers of evicted requests to confirm


class AttentionWorker(Rank):
    def __init__(self, rank: int, num_attention: int, num_experts_ranks: int, model_dir: str,
                 engine_config: EngineConfig, torch_threads: int = 1, idle_steps: int = 3,
                 skip_tokenizer_init: bool = False, metrics: MetricsOptions | None = None,
                 placement: Placement | None = None, eplb: EplbSettings | None = None,
                 capacities: list[int] | None = None):
        super().__init__(rank, num_attention + num_experts_ranks, torch_threads, engine_config.device, metrics)
        if num_experts_ranks and placement is None:
            raise ValueError("a gang with expert ranks needs the placement its builder made")
        self.num_expert_ranks = num_experts_ranks  # they hold ranks 0..E-1; attention ranks follow
        self.placement = placement  # the gang's one (MoE layer, expert) -> ranks table, made in cluster/gang.py
        self.model_dir, self.engine_config = model_dir, engine_config
        self.eplb, self.capacities = eplb or EplbSettings(), capacities  # slots per expert rank
        self.rebalancer: Rebalancer | None = None
        self.idle_steps, self.skip_tokenizer_init = idle_steps, skip_tokenizer_init
        self.engine: LLMEngine | None = None
        self._channels: dict[str, _Channel] = {}  # consumer -> its outputs not yet sent
        self._owners: dict[str, list] = {}  # request id -> [consumer, choices still open]
        self._loop: asyncio.AbstractEventLoop | None = None
        self.peers: list = []  # every other rank's actor handle: wakes go to them
        self.submitted = 0  # requests taken since start
        self.admitting = True  # False once its gang drains (or it leaves the gang): new requests go elsewhere
        self.leaving_alone = False  # this rank leaves a gang that serves on (`RankLeaving`, not `Draining`)
        self._evicting: asyncio.Future | None = None  # a drain's eviction, done at the next step boundary
        self._unheard: set[str] = set()  # consumers with evicted requests that have not said they moved them
        self._moved_on: set[str] = set()  # consumers that said so (`moved_on`)
        self._all_heard = asyncio.Event()
        self.comm: ExpertGroup | None = None
        self.step_seconds: list[float] = []  # recent steps with work, for the benchmark
        self.steps_timed = 0  # steps appended to step_seconds since start
        self._steps_exported = 0

    def adopt(self, rank: int, num_attention: int, placement: Placement | None) -> None:
        """A warm spare (started, imported, nothing loaded) takes the place of failed attention rank
        `rank`, before it joins the gang's group and loads."""
        if self.engine is not None:
            raise RuntimeError(f"attention rank {self.rank} is not a spare: it has joined a gang")
        self.rank, self.world_size, self.placement = rank, num_attention + self.num_expert_ranks, placement

    def load_weights(self) -> dict:
        """Build the model without routed experts (they are remote), load its weights, start an engine."""
        start = time.monotonic()
        config = load_config(self.model_dir)
        dtype = resolve_dtype(self.engine_config.dtype, self.device.type)
        with torch.device("meta"):
            model = Llama4ForCausalLM(config)
        if self.num_expert_ranks:
            self.comm = ExpertGroup(self.group, self.rank, self.world_size, self.num_expert_ranks, config.hidden_size,
                                    dtype, self.device)
            model = shard_experts(model, self.comm, self.placement)
        apply_quantization(model, self.model_dir)  # an FP8 checkpoint: shared experts, dense MLPs in FP8
        materialize(model, self.device)
        with CheckpointReader(self.model_dir) as reader:
            report = load_model(model, reader, dtype, strict=False, progress=self.progress)
        vision = load_vision_tower(self.model_dir, dtype, self.device)  # images run where their request does
        self.weight_bytes = weight_bytes(model) + (weight_bytes(vision) if vision is not None else 0)
        model = optimize_for_inference(model.eval())
        tokenizer = None if self.skip_tokenizer_init else Tokenizer(self.model_dir)
        self._new_epoch(LLMEngine(model, self.engine_config, tokenizer, load_generation_defaults(self.model_dir),
                                  vision))
        log.info("attention rank %d loaded %.1f MB in %.1fs", self.rank, report.bytes_read / 1e6,
                 time.monotonic() - start)
        return {"rank": self.rank, "bytes_read": report.bytes_read, "seconds": time.monotonic() - start,
                "expert_keys_read": sum(".experts." in k for k in report.keys_read),
                "weight_bytes": self.weight_bytes}

    def reset(self) -> None:
        """After a failure, on the new group: an empty engine over the same model (its KV cache and
        requests are gone with the failed epoch), no consumers, a new wave."""
        old = self.engine
        for channel in self._channels.values():
            channel.close()
        self._channels, self._owners = {}, {}
        self.admitting, self.leaving_alone = True, False  # a rank that was leaving when the gang failed stays
        self._new_epoch(LLMEngine(old.model, self.engine_config, old.tokenizer, old.defaults, old.vision))

    def resume_on_group(self) -> None:
        """A regroup: the same engine (its requests and KV cache) stepped by a new wave on the new group."""
        self._new_epoch(self.engine)

    def _new_epoch(self, engine: LLMEngine) -> None:
        """This engine, stepped by a new wave on the current group; the wave is bound to this engine,
        so a wave thread of a failed epoch can never step the new one."""
        engine.collective = bool(self.num_expert_ranks)
        group = self.group if self.num_expert_ranks else None
        if self.num_expert_ranks:  # a new epoch starts its rebalancing afresh, on the table it has
            config = engine.model_config
            self.rebalancer = Rebalancer(self.eplb, self.placement, list(config.moe_layers), config.num_experts,
                                         self.capacities or [], group, self.device)
        planned: list = []  # (when, PlannedStep) between this epoch's plan and its run: per epoch, so a late
        # wave thread of a failed epoch never runs the new one's plan
        wave = WaveLoop(group, self.idle_steps, lambda: self._plan(engine, planned),
                        lambda agreed: self._step(engine, planned, agreed), f"attention-{self.rank}",
                        self.torch_threads, self.device)
        wave.on_failure = lambda exc: self._on_failure(exc, wave, engine)
        engine.on_work = wave.wake_local  # a request's grammar compiled: it can be scheduled now
        if self.comm is not None:
            self.comm.bind(self.group, self.world_size, wave.thread)
        self.engine, self.wave = engine, wave

    def start(self, peers: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()  # sync methods of this async actor run on its loop
        self.peers = peers or []
        self.wave.wake_peers = self._wake_peers
        self.wave.start()
        self.start_metrics("attention")

    def _wake_peers(self, generation: int) -> None:  # on the wave thread
        self._loop.call_soon_threadsafe(lambda: [peer.wake.remote(generation) for peer in self.peers])

    def publish_metrics(self, metrics) -> None:
        super().publish_metrics(metrics)
        done, window = self.steps_timed, self.step_seconds
        new = min(done - self._steps_exported, len(window))
        self._steps_exported = done
        metrics.engine(self.engine.snapshot, window[len(window) - new:] if new > 0 else [])

    # -- requests (called on the actor's event loop while waves run on their own thread) -----------

    def submit(self, request: GenerateRequest, consumer: str) -> None:
        """Queue a request whose outputs go to `consumer`'s channel; a typed `workers.errors` exception
        travels back to the caller if it is invalid."""
        if not self.admitting:
            raise self._leaving("retry")
        self.engine.submit(request)
        self.submitted += 1
        self._owners[request.request_id] = [self._channel(consumer), request.params.n]
        self.wave.wake_local()

    def requests_held(self) -> int:
        """Requests this engine holds, running or waiting, as of its last step."""
        s = self.engine.snapshot
        return s.num_running + s.num_waiting

    def load_report(self) -> dict:
        """What attention scaling reads each period (a small part of `stats`): requests and KV blocks."""
        s = self.engine.snapshot
        return {"running": s.num_running, "waiting": s.num_waiting, "kv": dataclasses.asdict(s.kv)}

    def stop_admitting(self) -> None:
        """Its gang drains: new requests are refused with `Draining` (the ingress sends them elsewhere)."""
        self.admitting = False

    def _leaving(self, what: str) -> Draining:
        if self.leaving_alone:
            return RankLeaving(f"attention rank {self.rank} leaves its gang; {what}")
        return Draining(f"the gang of attention rank {self.rank} is leaving; {what}")

    async def evict(self, timeout_s: float = 30.0, alone: bool = False) -> int:
        """End every request here with `Draining` at the next step boundary (the ingress resumes each on
        another gang, token-exactly); returns, with how many, once every consumer that had one said it
        moved them (`moved_on`): the ranks may stop then without cutting a batch off on its way.
        `alone`: only this rank leaves, the gang serves on (`RankLeaving`: moved within the gang too)."""
        self.admitting, self.leaving_alone = False, alone
        self._evicting = self._loop.create_future()
        self.wave.wake_local()
        evicted = await asyncio.wait_for(self._evicting, timeout_s)
        try:  # a live consumer answers in milliseconds; a gone one (the app shutting down) never does
            await asyncio.wait_for(self._all_heard.wait(), CONFIRM_S)
        except asyncio.TimeoutError:
            log.warning("attention rank %d: consumers %s did not confirm their evicted requests in %gs",
                        self.rank, sorted(self._unheard), CONFIRM_S)
        return evicted

    def moved_on(self, consumer: str) -> None:
        """`consumer` got the `Draining` end of its requests here and moves them elsewhere."""
        self._moved_on.add(consumer)
        self._unheard.discard(consumer)
        if not self._unheard:
            self._all_heard.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.wave.wake_local()

    async def outputs(self, consumer: str):
        """`consumer`'s channel (a streaming call, one per consumer): one list per step with every new
        output of its requests. A second call with the same name takes the channel over. Ends with
        `Unavailable` once this rank's wave has failed (after the requests' own error outputs)."""
        channel = self._channel(consumer)
        channel.listeners += 1
        generation = channel.listeners
        while channel.listeners == generation and not channel.closed:
            if not channel.items:
                if self.wave.failed is not None:
                    raise Unavailable(f"attention rank {self.rank} failed: {self.wave.failed}")
                channel.ready.clear()
                await channel.ready.wait()
                continue
            batch, channel.items = channel.items, []
            yield batch

    def _channel(self, consumer: str) -> "_Channel":
        channel = self._channels.get(consumer)
        if channel is None:
            channel = self._channels[consumer] = _Channel()
        return channel

    def _route(self, outputs: list[RequestOutput]) -> None:
        """On the actor's loop: each output to its consumer's channel, each channel woken once."""
        touched = set()
        for out in outputs:
            owner = self._owners.get(out.request_id)
            if owner is None:
                continue
            channel = owner[0]
            channel.items.append(out)
            touched.add(id(channel))
            if out.finished:
                owner[1] -= 1
                if not owner[1]:
                    del self._owners[out.request_id]
        for channel in self._channels.values():
            if id(channel) in touched or self.wave.failed is not None:
                channel.ready.set()

    def health(self) -> dict:
        state = self.wave_state()
        if state["failed"]:
            raise Unavailable(f"attention rank {self.rank} failed: {state['failed']}")
        return state

    def stats(self) -> dict:
        """The engine's snapshot of its last step: never the live structures the wave thread mutates."""
        s = self.engine.snapshot
        return {**self.wave_state(), "submitted": self.submitted, "running": s.num_running, "waiting": s.num_waiting,
                "pending_tokens": s.pending_tokens, "kv": dataclasses.asdict(s.kv),
                "preemptions": s.num_preemptions_total, "blocked_steps": s.num_blocked_steps_total,
                "engine_steps": s.num_steps, "scheduled_tokens": s.scheduled_tokens_total,
                "prompt_tokens": s.prompt_tokens_total, "generation_tokens": s.generation_tokens_total,
                "alltoall_seconds": self.comm.alltoall_seconds if self.comm else 0.0,
                "alltoall_bytes": self.comm.alltoall_bytes if self.comm else 0,
                "weight_bytes": self.weight_bytes, "microbatched_steps": s.microbatched_steps_total,
                "step_seconds": list(self.step_seconds), "steps_timed": self.steps_timed,
                "eplb": dataclasses.asdict(self.rebalancer.stats) if self.rebalancer else None,
                "placement": self.placement.table if self.placement else None}

    # -- on the wave thread -------------------------------------------------------------------------

    def _plan(self, engine: LLMEngine, planned: list) -> list[int]:  # on the wave thread
        # a blocked engine reports no pending tokens: planning it again would only count a blocked step
        start = time.perf_counter()  # a step's time runs from its plan through the agreement to its end
        if self._evicting is not None:  # a step boundary: no request of this engine is mid-step
            evicting, self._evicting = self._evicting, None
            outputs = engine.fail_all(self._leaving("moving on"))
            self._loop.call_soon_threadsafe(self._evicted, outputs, evicting)
        step = engine.plan() if engine.pending_tokens() else PlannedStep([], None, [], [])
        planned[:] = [start, step]
        return [*step.proposal(), self.rebalancer.vote() if self.rebalancer else 0]

    def _step(self, engine: LLMEngine, planned: list, agreed: list[int]) -> None:  # on the wave thread
        start, step = planned
        if self.rebalancer is not None:
            self.rebalancer.before_step(agreed[2])
        microbatches = 0  # no rank has tokens: only this plan's outputs (aborts) go out
        if agreed[0] > 0:
            microbatches = self.comm.agree(agreed) if self.comm is not None else agreed[1]
        before = engine.num_steps
        outputs = engine.run(step, microbatches)
        if agreed[0] > 0 and self.rebalancer is not None:  # after the step's MoE collectives, as on every rank
            self.rebalancer.after_step()
        if engine.num_steps > before:  # a step that computed tokens: keep a window of their times
            self.step_seconds = (self.step_seconds + [time.perf_counter() - start])[-4096:]
            self.steps_timed += 1
        if outputs:
            self._publish(outputs)

    def _on_failure(self, exc: BaseException, wave: WaveLoop, engine: LLMEngine) -> None:
        if wave is self.wave:  # a wave of a failed epoch that ends late leaves the new one alone
            self._publish(engine.fail_all(Unavailable(f"the gang failed: {exc}")))

    def _evicted(self, outputs: list[RequestOutput], done: asyncio.Future) -> None:  # on the actor's loop
        owners = {id(self._owners[out.request_id][0]) for out in outputs if out.request_id in self._owners}
        self._unheard = {name for name, channel in self._channels.items()
                         if id(channel) in owners and name not in self._moved_on}
        if not self._unheard:
            self._all_heard.set()
        self._route(outputs)
        if self.leaving_alone:  # every consumer hears that this rank leaves, with requests here or not,
            # so its channel's end is not taken for a failure of the gang
            for channel in self._channels.values():
                channel.items.append(RequestOutput("", [], finish_reason="error", error=self._leaving("moving on")))
                channel.ready.set()
        if not done.done():
            done.set_result(len({out.request_id for out in outputs}))

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._loop.call_soon_threadsafe(self._route, outputs)


class _Channel:
    def __init__(self):
        self.items: list[RequestOutput] = []
        self.ready = asyncio.Event()
        self.listeners = 0  # calls of `outputs` so far: only the newest one sends
        self.closed = False  # the epoch it belonged to failed: its stream ends

    def close(self) -> None:
        self.closed = True
        self.ready.set()
