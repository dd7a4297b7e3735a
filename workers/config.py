"""Engine settings: batching limits, KV-cache size and layout, device and dtype; expert load balancing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class EngineConfig:
    max_num_seqs: int = 32  # sequences in one continuous batch
    max_num_batched_tokens: int = 1024  # tokens computed in one step (prefill chunks + decodes)
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int = 256 * 2**20  # bytes for K/V of all layers
    kv_blocks: dict[str, int] | None = None  # explicit blocks per layer group, instead of the memory plan
    max_model_len: int | None = None  # default: the checkpoint's limit, capped by the KV capacity
    enable_prefix_caching: bool = True
    free_chunked_blocks: bool = True  # release chunked-attention blocks behind the window
    # 2: a step of at least microbatch_min_tokens tokens runs as two micro-batches whose MoE layers
    # overlap (in a gang: one's attention while the other's tokens are with the experts)
    microbatches: int = 1
    microbatch_min_tokens: int = 16
    dtype: str | None = None  # default float32 on CPU, bfloat16 on GPU
    device: str = "cpu"
    # check the KV cache's bookkeeping after every step (slow; on in the test suite)
    check_invariants: bool = field(default_factory=lambda: os.environ.get("MAVERICK_CHECK_INVARIANTS") == "1")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.microbatches not in (1, 2):
            raise ValueError(f"microbatches must be 1 or 2, got {self.microbatches}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


@dataclass(frozen=True)
class EplbSettings:
    """A gang's expert load balancing (`workers.eplb.Rebalancer` applies it); kept beside the engine's
    settings so configs import without torch."""

    redundant_experts: int = 0  # spare slots per expert rank, filled with copies of the hottest experts
    rebalance_every_steps: int = 0  # 0: the placement made at start stays
    window_steps: int = 0  # the steps whose load a rebalance reads (the last before it); 0: all since the last
    # adopt a placement only if it raises the window's mean balancedness by this much (with weight_read_rows:
    # only if it lowers the busiest rank's modelled cost by this fraction)
    min_gain: float = 0.0
    weight_read_rows: float = 0.0  # one expert's weight read in rows of compute; 0: balance rows only
