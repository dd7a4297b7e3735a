"""The deployment schema, validated strictly: unknown keys and impossible layouts fail before anything
starts, with messages that name the path of the bad field.

This part describes one gang (its layout, resources and engine limits); the serving issue extends it
with the application's `args`.
"""

from __future__ import annotations

import os

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workers.config import EngineConfig, EplbSettings


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_bounds(settings: BaseModel, low: str, high: str) -> None:
    """A [min, max] pair of fields in order."""
    if getattr(settings, high) < getattr(settings, low):
        raise ValueError(f"{high} ({getattr(settings, high)}) is below {low} ({getattr(settings, low)})")


class RankResources(Strict):
    """What one rank (actor) asks Ray for."""

    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0, le=1)
    torch_threads: int = Field(1, ge=1, description="intra-op threads per actor (cores it may use)")


class EngineLimits(Strict):
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(1024, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    block_size: int = Field(16, ge=1)
    kv_cache_memory: int = Field(256 * 2**20, ge=1, description="bytes of K/V per attention worker")
    enable_prefix_caching: bool = True
    free_chunked_blocks: bool = True
    microbatches: int = Field(1, ge=1, le=2, description="2: steps of at least microbatch_min_tokens run as two "
                              "micro-batches whose MoE all-to-alls overlap the other's attention (gangs)")
    microbatch_min_tokens: int = Field(16, ge=1)

    def engine_config(self, dtype: str | None, device: str) -> EngineConfig:
        return EngineConfig(dtype=dtype, device=device, **self.model_dump())


class MetricsConfig(Strict):
    """Prometheus metrics through Ray's metrics agent (and `GET /metrics` on the serving port)."""

    enabled: bool = True
    period_s: float = Field(1.0, gt=0, description="how often each rank exports its step snapshot")
    expert_layer_matrix: bool = Field(False, description="tokens per (MoE layer, expert): layers x experts "
                                      "series per gang (24 x 128 for Maverick); per expert and per "
                                      "(layer, expert rank) are always exported")


class EplbConfig(Strict):
    """Expert load balancing: spare expert slots hold copies of the hottest experts, and the gang
    re-places experts from the load it measured, live (DeepSeek's EPLB, vLLM's --enable-eplb)."""

    redundant_experts: int = Field(0, ge=0, description="spare slots per expert rank, each a copy of a hot expert "
                                                        "(memory: `maverick plan` counts them)")
    rebalance_every_steps: int = Field(0, ge=0, description="steps with work between rebalances; 0: the placement "
                                                            "made at start stays")
    window_steps: int = Field(0, ge=0, description="the steps whose load a rebalance reads, the last before it; "
                                                   "0: every step since the last rebalance")
    min_gain: float = Field(0.02, ge=0, le=1, description="adopt a new placement only when it raises the "
                                                          "window's balancedness (mean over MoE layers) by this "
                                                          "much (with weight_read_rows: lowers the busiest "
                                                          "rank's modelled cost by this fraction): no bytes "
                                                          "moved for noise")
    weight_read_rows: float = Field(0.0, ge=0, description="one expert's weight read, in rows of compute: 0 balances "
                                                           "rows (vLLM's EPLB); above 0 the policy balances each "
                                                           "rank's rows plus the weight reads of the copies it "
                                                           "holds, and copies an expert only where that pays "
                                                           "(`maverick plan` gives it for a GPU)")

    @model_validator(mode="after")
    def _window_fits(self) -> "EplbConfig":
        if self.window_steps > self.rebalance_every_steps:
            raise ValueError(f"window_steps ({self.window_steps}) cannot exceed rebalance_every_steps "
                             f"({self.rebalance_every_steps})")
        return self

    def settings(self) -> EplbSettings:
        return EplbSettings(**self.model_dump())


class AttentionScalingConfig(Strict):
    """Attention ranks added to and removed from a running gang, its expert ranks untouched: when the KV
    cache or the queue of its attention ranks is high while its expert ranks have time to spare, and
    back when the load fits in fewer (`cluster.attention_scaling`). gloo gangs with expert ranks."""

    min_attention_workers: int = Field(1, ge=1)
    max_attention_workers: int = Field(2, ge=1)
    kv_high: float = Field(0.85, gt=0, le=1, description="add a rank when the attention ranks' KV cache use "
                                                        "(mean of each one's fullest group) reaches this")
    waiting_high: int = Field(1, ge=1, description="or when this many requests wait per attention rank")
    expert_busy_max: float = Field(0.8, gt=0, le=1, description="and only while the busiest expert rank computes "
                                                              "less than this share of the time")
    kv_low: float = Field(0.4, ge=0, lt=1, description="remove a rank when the KV use, spread over one rank fewer, "
                                                      "stays below this with nothing waiting")
    window_s: float = Field(5, ge=0, description="a condition holds this long before the gang acts on it")
    cooldown_s: float = Field(20, ge=0, description="no change this long after the last one")
    period_s: float = Field(1, gt=0, description="how often the ranks' load is read")
    drain_grace_s: float = Field(10, ge=0, description="a leaving rank's running requests may finish within "
                                                      "this; those still running then move (resumed)")

    @model_validator(mode="after")
    def _bounds(self) -> "AttentionScalingConfig":
        _check_bounds(self, "min_attention_workers", "max_attention_workers")
        return self


class GangConfig(Strict):
    model: str
    attention_workers: int = Field(1, ge=1)
    expert_workers: int = Field(0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    dtype: str | None = None  # float32 on CPU, bfloat16 on GPU
    device: Literal["cpu", "cuda"] = "cpu"
    attention: RankResources = RankResources()
    experts: RankResources = RankResources()
    engine: EngineLimits = EngineLimits()
    collective_timeout_s: float = Field(60, gt=0, description="a collective longer than this fails the gang")
    idle_steps: int = Field(3, ge=1, description="empty steps before the gang goes idle together")
    skip_tokenizer_init: bool = False
    metrics: MetricsConfig = MetricsConfig()
    eplb: EplbConfig | None = Field(None, description="expert load balancing (needs expert_workers)")
    attention_scaling: AttentionScalingConfig | None = Field(
        None, description="attention ranks that follow the gang's load (needs expert_workers; CPU gangs)")
    spares: int = Field(0, ge=0, description="warm expert-rank processes kept started beside the gang, each in a "
                        "placement-group bundle of its own: a failed expert rank is replaced by one, so the "
                        "replacement costs its weights only (needs expert_workers; CPU gangs)")
    attention_spares: int = Field(0, ge=0, description="warm attention-rank processes kept started beside the "
                                  "gang, as `spares` for attention ranks (needs expert_workers; CPU gangs)")
    orphan_grace_s: float = Field(60, gt=0, description="under Serve, a gang's ranks outlive its replica: one "
                                  "restarted re-attaches to them; ranks no replica has looked after for this "
                                  "long remove themselves")

    @model_validator(mode="after")
    def _eplb_needs_expert_ranks(self) -> "GangConfig":
        if self.eplb is not None and not self.expert_workers:
            raise ValueError("eplb balances experts over expert ranks: it needs expert_workers >= 1")
        return self

    @model_validator(mode="after")
    def _attention_scaling_fits(self) -> "GangConfig":
        s = self.attention_scaling
        if s is None:
            return self
        if not self.expert_workers:
            raise ValueError("attention_scaling regroups a gang's attention ranks beside its expert ranks: it needs "
                             "expert_workers >= 1 (without them, add gangs: autoscaling)")
        if self.device == "cuda":
            raise ValueError("attention_scaling is not built for NCCL gangs yet (device 'cuda'): use autoscaling")
        if not s.min_attention_workers <= self.attention_workers <= s.max_attention_workers:
            raise ValueError(f"attention_workers ({self.attention_workers}) must lie within attention_scaling's "
                             f"min_attention_workers ({s.min_attention_workers}) and max_attention_workers "
                             f"({s.max_attention_workers})")
        return self

    @model_validator(mode="after")
    def _spares_replace_expert_ranks(self) -> "GangConfig":
        if (self.spares or self.attention_spares) and not self.expert_workers:
            raise ValueError("spares stand in for failed ranks of a gang recovered in place: they need "
                             "expert_workers >= 1")
        if (self.spares or self.attention_spares) and self.device == "cuda":
            raise ValueError("spares are not built for NCCL gangs yet (device 'cuda'): a failed NCCL gang is rebuilt")
        return self

    @model_validator(mode="after")
    def _devices_match(self) -> "GangConfig":
        if self.device == "cuda" and (self.attention.num_gpus != 1 or
                                      (self.expert_workers and self.experts.num_gpus != 1)):
            raise ValueError("device 'cuda' needs num_gpus: 1 for every rank (one GPU per actor, NCCL)")
        return self

    @property
    def world_size(self) -> int:
        return self.attention_workers + self.expert_workers

    def expert_capacities(self, num_experts: int) -> list[int]:
        """Expert slots per expert rank: its contiguous share of the experts plus the spare slots."""
        spare = self.eplb.redundant_experts if self.eplb else 0
        E = self.expert_workers
        return [num_experts // E + (i < num_experts % E) + spare for i in range(E)]

    def check_experts(self, num_experts: int) -> None:
        """Experts are split contiguously, as evenly as the counts allow (128 over 6: 22,22,21,21,21,21);
        every expert worker needs at least one."""
        if self.expert_workers > num_experts:
            raise ValueError(f"expert_workers ({self.expert_workers}) exceeds the checkpoint's "
                             f"num_local_experts ({num_experts}): each expert worker needs at least one expert")


def describe(error: ValidationError, root: str = "") -> str:
    """One line per problem, each naming the dotted path of the field at fault."""
    lines = []
    for e in error.errors():
        path = ".".join(str(p) for p in (root, *e["loc"]) if p != "")
        lines.append(f"{path or '<root>'}: {e['msg']}")
    return "; ".join(lines)


class ServeResources(Strict):
    """The Serve replicas' own requests: fractions of a CPU, so a 2-core machine fits them."""

    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    supervisor_num_cpus: float = Field(0.1, gt=0)


class ImageSettings(Strict):
    """Image inputs of chat requests (checkpoints with a vision tower)."""

    max_per_request: int = Field(8, ge=0, description="images in one request; beyond: 400")
    max_bytes: int = Field(20 * 2**20, ge=1, description="one image, encoded (a data URL also counts against "
                                                          "max_body_bytes)")
    max_pixels: int = Field(40_000_000, ge=1, description="one image, decoded (width x height)")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="hosts whose http(s) image URLs the ingress may fetch; empty: remote "
                                          "URLs are refused (a server fetching any URL is an SSRF hole)")
    fetch_timeout_s: float = Field(10, gt=0)


class AutoscalingSettings(Strict):
    """Gangs that follow load: Serve's controller sets how many replicas of the `gangs` deployment run,
    from each gang's measured load (running + waiting requests over its capacity, `cluster.autoscale`)."""

    min_gangs: int = Field(1, ge=1)
    max_gangs: int = Field(2, ge=1)
    target_load: float = Field(0.75, gt=0, le=1, description="wanted requests per gang, as a fraction of its "
                                                           "capacity (max_num_seqs x attention_workers)")
    upscale_delay_s: float = Field(10, ge=0, description="load above target this long before a gang is added")
    downscale_delay_s: float = Field(120, ge=0, description="load below target this long before a gang leaves")
    metrics_interval_s: float = Field(2, gt=0, description="how often each gang reports its load to Serve")
    drain_grace_s: float = Field(30, ge=0, description="a leaving gang's running requests may finish within this; "
                                                      "those still running then move to other gangs (resumed)")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        _check_bounds(self, "min_gangs", "max_gangs")
        return self


class AppConfig(GangConfig):
    """The `args` of a deployment YAML (`router.app:build`): one gang layout served `num_gangs` times."""

    served_model_name: str | None = None  # default: `model` as given
    make_tiny: Literal["tiny-maverick", "tiny-scout", "bench", "tiny-maverick-fp8"] | None = Field(
        None, description="write a random-weight checkpoint of this preset at `model` when it is missing "
                          "(`-fp8`: in Meta's FP8 layout)")
    num_gangs: int = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = Field(None, description="gangs added and removed with load")
    api_key: str | None = Field(None, min_length=1, repr=False)
    api_key_env: str | None = Field(
        None, min_length=1, description="an environment variable of the ingress replicas holding the API key "
                                        "(a Kubernetes Secret, say): the key stays out of the YAML")
    max_pending_requests: int = Field(256, ge=1, description="in flight per ingress replica; beyond: 429")
    request_timeout_s: float = Field(600, gt=0, description="a request running longer gets 504")
    migration_limit: int = Field(3, ge=0, description="times a request moves on when its gang fails (to another "
                                                      "ready gang, or the same one rebuilt); 0: it ends with 503")
    max_body_bytes: int = Field(4 * 2**20, ge=1024)
    retry_after_s: int = Field(2, ge=1)
    graceful_shutdown_timeout_s: float = Field(120, ge=0)
    serve: ServeResources = ServeResources()
    images: ImageSettings = ImageSettings()

    @model_validator(mode="after")
    def _gangs_within_bounds(self) -> "AppConfig":
        a = self.autoscaling
        if a is not None and "num_gangs" in self.model_fields_set and not a.min_gangs <= self.num_gangs <= a.max_gangs:
            raise ValueError(f"num_gangs ({self.num_gangs}) must lie within autoscaling's min_gangs "
                             f"({a.min_gangs}) and max_gangs ({a.max_gangs})")
        if a is not None and a.drain_grace_s >= self.graceful_shutdown_timeout_s:
            raise ValueError(f"autoscaling.drain_grace_s ({a.drain_grace_s:g}) must be below "
                             f"graceful_shutdown_timeout_s ({self.graceful_shutdown_timeout_s:g}): moving the "
                             "requests left after it takes time too")
        return self

    @property
    def initial_gangs(self) -> int:
        """Gangs at start: `num_gangs`; with autoscaling and no `num_gangs`, its `min_gangs`."""
        a = self.autoscaling
        return a.min_gangs if a is not None and "num_gangs" not in self.model_fields_set else self.num_gangs

    def with_api_key_from_env(self) -> "AppConfig":
        """`api_key_env` resolved where the replica runs; unset there is an error, never an open door."""
        if self.api_key is not None or self.api_key_env is None:
            return self
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set on this replica")
        return self.model_copy(update={"api_key": key})

    def gang_config(self) -> GangConfig:
        return GangConfig(**{name: getattr(self, name) for name in GangConfig.model_fields})

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def parse_app_args(args: dict, root: str = "args") -> AppConfig:
    """Validate a YAML's `args`; a ValueError names the path of every bad field."""
    try:
        return AppConfig.model_validate(args or {})
    except ValidationError as exc:
        raise ValueError(f"invalid deployment args: {describe(exc, root)}") from None
