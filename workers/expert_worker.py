"""The expert worker: its slice of routed experts for every MoE layer, served in lock-step waves.

Each step it takes part in the same collectives as the attention ranks' forward: for every MoE
layer in order, receive rows, run the grouped expert FFN, send them back. It reads only its own
experts' bytes from the checkpoint.
"""

from __future__ import annotations

import logging
import time

import torch

from model.checkpoint import CheckpointReader
from model.config import load_config
from model.decoder import Llama4ForCausalLM
from model.loader import apply_quantization, expert_slice_names, load_model, materialize, resolve_dtype
from model.moe import RoutedExperts
from model.optimize import optimize_for_inference
from model.quant import weight_bytes
from workers.errors import Unavailable
from workers.expert_parallel import ExpertGroup, Placement, serve_layer, shard_experts
from workers.rank import MetricsOptions, Rank
from workers.wave import WaveLoop

log = logging.getLogger(__name__)


class ExpertWorker(Rank):
    def __init__(self, rank: int, num_attention: int, num_expert_ranks: int, model_dir: str, placement: Placement,
                 dtype: str | None = None, device: str = "cpu", torch_threads: int = 1, idle_steps: int = 3,
                 metrics: MetricsOptions | None = None):
        super().__init__(rank, num_attention + num_expert_ranks, torch_threads, device, metrics)
        self.num_attention = num_attention
        self.placement = placement  # the gang's one (MoE layer, expert) -> ranks table, made in cluster/gang.py
        self.model_dir, self.dtype_name, self.idle_steps = model_dir, dtype, idle_steps
        self.rows_served = 0
        self._fault_in: int | None = None  # chaos testing: steps until an injected failure

    def load_weights(self) -> dict:
        start = time.monotonic()
        config = load_config(self.model_dir)
        dtype = resolve_dtype(self.dtype_name, self.device.type)
        self.comm = ExpertGroup(self.group, self.rank, self.world_size, config.hidden_size, dtype, self.device)
        with torch.device("meta"):
            shard = shard_experts(Llama4ForCausalLM(config), self.comm, self.placement, self.num_attention)
        # an FP8 checkpoint: the experts stay FP8 in memory
        apply_quantization(shard, self.model_dir, names=expert_slice_names)
        materialize(shard, self.device)
        with CheckpointReader(self.model_dir) as reader:
            report = load_model(shard, reader, dtype, strict=False, progress=self.progress, names=expert_slice_names)
        self.weight_bytes = weight_bytes(shard)
        self.shard = optimize_for_inference(shard)
        self.layers = [shard.experts(layer) for layer in config.moe_layers]
        self.moe_layers = list(config.moe_layers)
        # rows routed to each expert per MoE layer, since start (whole-model expert ids)
        self.expert_load_LE = torch.zeros(len(self.layers), config.num_experts, dtype=torch.long, device=self.device)
        self.owned_experts = self.layers[0].expert_ids
        # on a GPU, no host read per MoE layer (bf16/fp32 experts; FP8 ones keep their per-expert loop)
        self.sync_free = self.device.type == "cuda" and all(isinstance(x, RoutedExperts) for x in self.layers)
        self.snapshot = self._snapshot()
        self._new_wave()
        log.info("expert rank %d holds experts %s: %.1f MB in %.1fs", self.rank, self.owned_experts,
                 report.bytes_read / 1e6, time.monotonic() - start)
        return {"rank": self.rank, "bytes_read": report.bytes_read, "seconds": time.monotonic() - start,
                "experts": self.owned_experts, "weight_bytes": self.weight_bytes}

    def start(self) -> None:
        self.wave.start()
        self.start_metrics("experts")

    def publish_metrics(self, metrics) -> None:
        super().publish_metrics(metrics)
        snapshot = self.snapshot
        metrics.experts(snapshot["moe_layers"], snapshot["expert_load"].tolist())

    def reset(self) -> None:
        """After a failure, on the new group: a new wave; the experts stay loaded."""
        self._fault_in = None
        self._new_wave()

    def _new_wave(self) -> None:
        wave = WaveLoop(self.group, self.idle_steps, lambda: [0, 0], self._step, f"experts-{self.rank}",
                        self.torch_threads, self.device)  # an expert rank proposes nothing: it serves
        self.comm.bind(self.group, wave.thread)  # a wave thread of a failed epoch raises at its next collective
        self.wave = wave

    def inject_fault(self, steps: int) -> None:
        """Chaos testing: the wave step `steps` from now raises, as a broken expert kernel would."""
        self._fault_in = steps

    @torch.inference_mode()
    def _step(self, agreed: list[int]) -> None:
        if agreed[0] == 0:  # no attention rank has tokens this round
            return
        if self._fault_in is not None:
            self._fault_in -= 1
            if self._fault_in <= 0:
                self._fault_in = None
                raise RuntimeError(f"expert rank {self.rank}: injected fault")
        microbatches = self.comm.agree(agreed)
        for experts, load_E in zip(self.layers, self.expert_load_LE):
            for _ in range(microbatches):
                self.rows_served += serve_layer(self.comm, experts, self.num_attention, load_E=load_E,
                                                sync_free=self.sync_free)
        self.snapshot = self._snapshot()

    def health(self) -> dict:
        state = self.wave_state()
        if state["failed"]:
            raise Unavailable(f"expert rank {self.rank} failed: {state['failed']}")
        return state

    def _snapshot(self) -> dict:
        """Counters of this rank, frozen at the end of a step (read by other threads)."""
        return {"rows_served": int(self.rows_served), "alltoall_bytes": self.comm.alltoall_bytes,
                "alltoall_seconds": self.comm.alltoall_seconds, "moe_layers": self.moe_layers,
                "weight_bytes": self.weight_bytes,
                "experts": self.owned_experts, "expert_load": self.expert_load_LE.clone()}

    def stats(self) -> dict:
        snapshot = dict(self.snapshot)
        snapshot["expert_load"] = snapshot["expert_load"].tolist()
        return {**self.wave_state(), **snapshot}
