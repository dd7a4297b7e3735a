"""The expert worker: its slice of routed experts for every MoE layer, served in lock-step waves.

Each step it takes part in the same collectives as the attention ranks' forward: for every MoE
layer in order, receive rows, run the grouped expert FFN, send them back. It reads only its own
experts' bytes from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Callable

import torch

from model.checkpoint import CheckpointReader
from model.config import load_config
from model.decoder import Llama4ForCausalLM
from model.loader import (LoadProgress, LoadReport, apply_quantization, expert_slice_names, load_model, materialize,
                          resolve_dtype)
from model.moe import FREE, ExpertSlices, RoutedExperts, fill_slots, held_experts, pad_slots
from model.optimize import optimize_for_inference
from model.quant import weight_bytes
from workers.config import EplbSettings
from workers.eplb import Rebalancer
from workers.errors import Unavailable
from workers.expert_placement import LayerPlacement
from workers.expert_parallel import ExpertGroup, Placement, serve_layer, shard_experts
from workers.rank import MetricsOptions, Rank
from workers.wave import WaveLoop

log = logging.getLogger(__name__)


class ExpertWorker(Rank):
    def __init__(self, rank: int, num_attention: int, num_expert_ranks: int, model_dir: str, placement: Placement,
                 dtype: str | None = None, device: str = "cpu", torch_threads: int = 1, idle_steps: int = 3,
                 metrics: MetricsOptions | None = None, eplb: EplbSettings | None = None,
                 capacities: list[int] | None = None):
        super().__init__(rank, num_attention + num_expert_ranks, torch_threads, device, metrics)
        self.num_expert_ranks = num_expert_ranks
        self.placement = placement  # the gang's one (MoE layer, expert) -> ranks table, made in cluster/gang.py
        self.model_dir, self.dtype_name, self.idle_steps = model_dir, dtype, idle_steps
        self.rows_served = 0
        self.peers: list = []  # every other rank's actor handle: wakes go to them
        self.steps_served, self.compute_seconds, self.compute_cpu_seconds = 0, 0.0, 0.0  # steps with work, computing
        self.eplb, self.capacities = eplb or EplbSettings(), capacities  # slots per expert rank
        self._fault_in: int | None = None  # chaos testing: steps until an injected failure

    def adopt(self, rank: int, num_attention: int, placement: Placement) -> None:
        """A warm spare (started, imported, nothing loaded) takes the place of failed expert rank `rank`,
        before it joins the gang's group and loads that rank's experts."""
        if getattr(self, "comm", None) is not None:
            raise RuntimeError(f"expert rank {self.rank} is not a spare: it has joined a gang")
        self.rank, self.world_size, self.placement = rank, num_attention + self.num_expert_ranks, placement

    def load_weights(self) -> dict:
        start = time.monotonic()
        config = load_config(self.model_dir)
        dtype = resolve_dtype(self.dtype_name, self.device.type)
        self.comm = ExpertGroup(self.group, self.rank, self.world_size, self.num_expert_ranks, config.hidden_size, dtype,
                                self.device)
        with torch.device("meta"):
            shard = shard_experts(Llama4ForCausalLM(config), self.comm, self.placement)
        rebalancing = self.eplb.rebalance_every_steps and self.capacities
        slots = self.capacities[self.rank] if rebalancing else 0
        shard, report = self._read_experts(shard, self.progress, slots)
        self.config = config
        self.weight_bytes = weight_bytes(shard)
        self.layers = [shard.experts(layer) for layer in config.moe_layers]
        self.moe_layers = list(config.moe_layers)
        # rows routed to each expert per MoE layer, since start (whole-model expert ids)
        self.expert_load_LE = torch.zeros(len(self.layers), config.num_experts, dtype=torch.long, device=self.device)
        self.owned_experts = held_experts(self.layers[0])
        # on a GPU, no host read per MoE layer (bf16/fp32 experts; FP8 ones keep their per-expert loop)
        self.sync_free = self.device.type == "cuda" and all(isinstance(x, RoutedExperts) for x in self.layers)
        self._new_wave()
        self.snapshot = self._snapshot()
        log.info("expert rank %d holds experts %s: %.1f MB in %.1fs", self.rank, self.owned_experts,
                 report.bytes_read / 1e6, time.monotonic() - start)
        return {"rank": self.rank, "bytes_read": report.bytes_read, "seconds": time.monotonic() - start,
                "experts": self.owned_experts, "weight_bytes": self.weight_bytes}

    def _read_experts(self, shard: ExpertSlices, progress: LoadProgress | None = None,
                      slots: int = 0) -> tuple[ExpertSlices, LoadReport]:
        """Fill `shard` (on the meta device) from this rank's byte ranges of the checkpoint; each layer
        grown to `slots` rows, so a rebalance never allocates (`pad_slots`)."""
        apply_quantization(shard, self.model_dir, names=expert_slice_names)  # FP8 experts stay FP8 in memory
        materialize(shard, self.device)
        with CheckpointReader(self.model_dir) as reader:
            report = load_model(shard, reader, resolve_dtype(self.dtype_name, self.device.type), strict=False,
                                progress=progress, names=expert_slice_names)
        for experts in shard.layers.values():
            pad_slots(experts, slots)
        return optimize_for_inference(shard), report

    def _stage(self, placements: dict[int, LayerPlacement]) -> tuple[Callable[[], None], int]:
        """A rebalance's new experts for this rank, read beside the ones it serves (off the wave thread);
        returns what puts them in at the switch step (in place of the experts it drops: `fill_slots`),
        and the bytes read."""
        slot = self.rank  # expert ranks come first: an expert rank's rank is its slot in the placement
        wanted = {layer: list(placements[layer].slots[slot]) for layer in self.moe_layers}
        held = {layer: held_experts(experts) for layer, experts in zip(self.moe_layers, self.layers)}
        missing = {layer: [e for e in wanted[layer] if e not in held[layer]] for layer in self.moe_layers}
        with torch.device("meta"):
            fresh = ExpertSlices(self.config, missing)
        fresh, report = self._read_experts(fresh)

        def install() -> None:  # on the wave thread, at the switch step: the copy that does not overlap
            start = time.perf_counter()
            self.layers = [fill_slots(old, wanted[layer], fresh.experts(layer)) if missing[layer] else old
                           for layer, old in zip(self.moe_layers, self.layers)]
            self.owned_experts = sorted(held_experts(self.layers[0]))
            self.weight_bytes = sum(weight_bytes(x) for x in self.layers)
            log.info("expert rank %d put %d experts in its slots in %.1f ms", self.rank,
                     sum(map(len, missing.values())), (time.perf_counter() - start) * 1e3)
        return install, report.bytes_read

    def start(self, peers: list | None = None) -> None:
        self.peers = peers or []
        self.wave.wake_peers = self._wake_peers
        self.wave.start()
        self.start_metrics("experts")

    def _wake_peers(self, generation: int) -> None:  # on the wave thread
        for peer in self.peers:
            peer.wake.remote(generation)

    def publish_metrics(self, metrics) -> None:
        super().publish_metrics(metrics)
        snapshot = self.snapshot
        metrics.experts(snapshot["moe_layers"], snapshot["expert_load"].tolist())
        if self.rebalancer.active:
            metrics.eplb(snapshot["eplb"])

    def reset(self) -> None:
        """After a failure, on the new group: a new wave; the experts stay loaded."""
        self._fault_in = None
        self._new_wave()

    def resume_on_group(self) -> None:
        """A regroup: a new wave on the new group; the experts stay loaded, the placement stays."""
        self._new_wave()

    def _new_wave(self) -> None:
        self.rebalancer = Rebalancer(self.eplb, self.placement, self.moe_layers, self.config.num_experts,
                                     self.capacities or [], self.group, self.device,
                                     load=lambda: self.expert_load_LE, stage=self._stage,
                                     staged=lambda: self.wave.wake_local())  # an idle gang switches too
        # an expert rank proposes no tokens: it serves; it votes on a rebalance
        wave = WaveLoop(self.group, self.idle_steps, lambda: [0, 0, self.rebalancer.vote()], self._step,
                        f"experts-{self.rank}", self.torch_threads, self.device)
        self.comm.bind(self.group, self.world_size, wave.thread)  # a wave thread of a failed epoch raises at its next collective
        self.wave = wave

    def inject_fault(self, steps: int) -> None:
        """Chaos testing: the wave step `steps` from now raises, as a broken expert kernel would."""
        self._fault_in = steps

    @torch.inference_mode()
    def _step(self, agreed: list[int]) -> None:
        before = self.rebalancer.stats
        self.rebalancer.before_step(agreed[2])
        if agreed[0] == 0:  # no attention rank has tokens this round
            if self.rebalancer.stats is not before:  # it switched (or dropped) a rebalance: say so
                self.snapshot = self._snapshot()
            return
        if self._fault_in is not None:
            self._fault_in -= 1
            if self._fault_in <= 0:
                self._fault_in = None
                raise RuntimeError(f"expert rank {self.rank}: injected fault")
        microbatches = self.comm.agree(agreed)
        start, cpu_start, waited = time.perf_counter(), time.thread_time(), self.comm.alltoall_seconds
        for experts, load_E in zip(self.layers, self.expert_load_LE):
            for _ in range(microbatches):
                self.rows_served += serve_layer(self.comm, experts, load_E=load_E,
                                                sync_free=self.sync_free)
        # this rank's own work in the step: its wall time less the waits in collectives; and the wave
        # thread's CPU time (what the rank would take with a core, or a device, of its own)
        self.compute_seconds += time.perf_counter() - start - (self.comm.alltoall_seconds - waited)
        self.compute_cpu_seconds += time.thread_time() - cpu_start
        self.steps_served += 1
        self.rebalancer.after_step()
        self.snapshot = self._snapshot()

    def expert_digests(self) -> dict[int, dict[int, str]]:
        """Per MoE layer, a digest of each held expert's weight bytes: every replica of an expert must
        hold what its original holds, whichever rank read or kept it."""
        out = {}
        for layer, experts in zip(self.moe_layers, self.layers):
            params = [p for _, p in experts.named_parameters(recurse=False)]
            out[layer] = {e: hashlib.sha256(b"".join(p[row].contiguous().view(torch.uint8).cpu().numpy().tobytes()
                                                     for p in params)).hexdigest()
                          for row, e in enumerate(experts.expert_ids) if e != FREE}
        return out

    def compute_seconds_total(self) -> float:
        """This rank's computing time since start, as of its last step (attention scaling reads it)."""
        return self.snapshot["compute_seconds"]

    def health(self) -> dict:
        state = self.wave_state()
        if state["failed"]:
            raise Unavailable(f"expert rank {self.rank} failed: {state['failed']}")
        return state

    def _snapshot(self) -> dict:
        """Counters of this rank, frozen at the end of a step (read by other threads)."""
        return {"rows_served": int(self.rows_served), "steps_served": self.steps_served,
                "compute_seconds": self.compute_seconds, "compute_cpu_seconds": self.compute_cpu_seconds,
                "alltoall_bytes": self.comm.alltoall_bytes,
                "alltoall_seconds": self.comm.alltoall_seconds, "moe_layers": self.moe_layers,
                "weight_bytes": self.weight_bytes, "experts": self.owned_experts,
                "experts_by_layer": {layer: sorted(held_experts(x)) for layer, x in zip(self.moe_layers, self.layers)},
                "expert_load": self.expert_load_LE.clone(), "eplb": dataclasses.asdict(self.rebalancer.stats)}

    def stats(self) -> dict:
        snapshot = dict(self.snapshot)
        snapshot["expert_load"] = snapshot["expert_load"].tolist()
        return {**self.wave_state(), **snapshot, "loaded_bytes": self.progress.loaded_bytes}
