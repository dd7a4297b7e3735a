"""Llama 4 text-model configuration: read from Hugging Face `config.json`, or a named preset.

Derived fields follow transformers exactly (LLAMA4.md §2): `no_rope_layers[i] == 1` means layer i
USES RoPE (and chunked attention); 0 means a NoPE layer with full causal attention.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNKED = "chunked_attention"
FULL = "full_attention"


@dataclass(kw_only=True)
class RopeScaling:
    rope_type: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(kw_only=True)
class Llama4Config:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # dense (non-MoE) layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int | None = 128
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 1
    moe_layers: list[int] | None = None
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    layer_types: list[str] | None = None
    use_qk_norm: bool = True
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.no_rope_layers:  # None or [] (transformers treats both as "derive")
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            if step < 1:
                raise ValueError("interleave_moe_layer_step must be >= 1 when moe_layers is not given")
            self.moe_layers = list(range(step - 1, n, step))
        if self.layer_types is None:
            chunking = self.attention_chunk_size is not None
            self.layer_types = [CHUNKED if r and chunking else FULL for r in self.no_rope_layers]
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        self._validate()

    def _validate(self) -> None:
        n = self.num_hidden_layers
        if len(self.no_rope_layers) != n or len(self.layer_types) != n:
            raise ValueError(f"no_rope_layers/layer_types must have {n} entries (num_hidden_layers)")
        if any(t not in (CHUNKED, FULL) for t in self.layer_types):
            raise ValueError(f"layer_types may hold only {CHUNKED!r} and {FULL!r}")
        if CHUNKED in self.layer_types and not self.attention_chunk_size:
            raise ValueError("chunked_attention layers need attention_chunk_size")
        if any(not 0 <= i < n for i in self.moe_layers):
            raise ValueError(f"moe_layers {self.moe_layers} out of range for {n} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError("num_experts_per_tok must be between 1 and num_local_experts")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Llama 4 uses silu)")

    # Derived views used by the decoder and the KV cache.
    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def is_chunked(self, layer: int) -> bool:
        return self.layer_types[layer] == CHUNKED

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def to_hf_text_dict(self) -> dict[str, Any]:
        """The `text_config` of a transformers checkpoint (legacy rope keys, read by 4.x and 5.x)."""
        d = dataclasses.asdict(self)
        rs = d.pop("rope_scaling")
        d["rope_scaling"] = None if rs["rope_type"] == "default" else rs
        d["model_type"] = "llama4_text"
        return d




def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Accept both legacy `rope_theta`/`rope_scaling` and v5 `rope_parameters`."""
    params = d.get("rope_parameters")
    theta = d.get("rope_theta", 500000.0)
    scaling = d.get("rope_scaling")
    if params:
        theta = params.get("rope_theta", theta)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if not scaling:
        return float(theta), RopeScaling()
    kind = scaling.get("rope_type", scaling.get("type", "llama3"))
    if kind == "default":
        return float(theta), RopeScaling()
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported (Llama 4 uses llama3 or none)")
    return float(theta), RopeScaling(
        rope_type="llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def config_from_hf(raw: dict[str, Any]) -> Llama4Config:
    """Build from a `config.json` dict: Llama4ForConditionalGeneration (nested) or text-only."""
    d = dict(raw.get("text_config") or raw)
    if raw.get("text_config") is not None:
        # the top level may carry generation ids the text sub-config lacks
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            d.setdefault(key, raw.get(key))
    theta, scaling = _rope_from_hf(d)
    names = {f.name for f in dataclasses.fields(Llama4Config)}
    kwargs = {k: v for k, v in d.items() if k in names and k not in ("rope_theta", "rope_scaling")}
    kwargs["rope_theta"], kwargs["rope_scaling"] = theta, scaling
    if d.get("dtype") and "torch_dtype" not in d:
        kwargs["torch_dtype"] = d["dtype"]
    kwargs["attn_temperature_tuning"] = bool(d.get("attn_temperature_tuning", True))
    if kwargs.get("eos_token_id") is None:
        kwargs["eos_token_id"] = []
    return Llama4Config(**kwargs)


def load_config(model_dir: str | Path) -> Llama4Config:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory needs a Hugging Face config.json")
    return config_from_hf(json.loads(path.read_text()))


# Architecture presets (not files). Real sizes for scout / maverick, from LLAMA4.md §1.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        vocab_size=256, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, interleave_moe_layer_step=2, no_rope_layer_interval=2,
        attention_chunk_size=8, floor_scale=4, max_position_embeddings=512, use_qk_norm=True,
        torch_dtype="float32", bos_token_id=1, eos_token_id=[2],
    ),
    "scout": dict(
        num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        rope_scaling=RopeScaling(rope_type="llama3", factor=16.0, low_freq_factor=1.0,
                                 high_freq_factor=1.0, original_max_position_embeddings=8192),
        max_position_embeddings=10485760, bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
    ),
    "maverick": dict(
        num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
        max_position_embeddings=1048576, bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
    ),
}


def preset(name: str, **overrides: Any) -> Llama4Config:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return Llama4Config(**{**PRESETS[name], **overrides})
