"""Llama 4's vision tower and projector: 336-px tiles in, one text-width vector per `<|patch|>` out.

Parameter names follow `Llama4ForConditionalGeneration`'s state dict (`vision_model.*`,
`multi_modal_projector.*`), so the checkpoint loads without renaming (LLAMA4.md §8).

Shape suffixes: N tiles, C channels, P patches (+1 for the class token), H heads, K head_dim,
D vision width, E text width.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632
    image_size: int = 336  # the tile side
    patch_size: int = 14
    num_channels: int = 3
    vision_output_dim: int = 4096
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    pixel_shuffle_ratio: float = 0.5
    rope_theta: float = 10000.0
    text_hidden_size: int = 5120
    image_token_index: int = 200092  # <|patch|>

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens one tile becomes after the pixel shuffle (144 for the real tower)."""
        return int(self.patches_per_side ** 2 * self.pixel_shuffle_ratio ** 2)


def vision_config_from_hf(raw: dict[str, Any]) -> VisionConfig | None:
    """The tower of a `Llama4ForConditionalGeneration` config.json; None for a text-only checkpoint."""
    v = raw.get("vision_config")
    if not v or raw.get("text_config") is None:
        return None
    names = {f.name for f in dataclasses.fields(VisionConfig)}
    kwargs = {k: v[k] for k in names if k in v}
    theta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta"))
    if theta is not None:
        kwargs["rope_theta"] = float(theta)
    kwargs["text_hidden_size"] = raw["text_config"]["hidden_size"]
    if raw.get("image_token_index") is not None:
        kwargs["image_token_index"] = raw["image_token_index"]
    return VisionConfig(**kwargs)


def load_vision_config(model_dir: str | Path) -> VisionConfig | None:
    path = Path(model_dir) / "config.json"
    return vision_config_from_hf(json.loads(path.read_text())) if path.is_file() else None


def vision_freqs_cis(c: VisionConfig) -> torch.Tensor:
    """2D RoPE angles [P+1, K/2] as complex64: patch k rotates by (x+1)·f then (y+1)·f with x = k % side,
    y = k // side; the class token (last) is not rotated. Same fp32 ops as transformers."""
    side = c.patches_per_side
    k = torch.arange(side * side, dtype=torch.int32)
    freq_dim = c.head_dim // 2
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))
    angles = torch.cat([(k % side + 1)[:, None] * inv_freq, (k // side + 1)[:, None] * inv_freq], dim=-1)
    angles = torch.cat([angles.float(), torch.zeros(1, freq_dim)])
    return torch.view_as_complex(torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1))


def rotate(x_NPHK: torch.Tensor, freqs_PK: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x_NPHK.float().reshape(*x_NPHK.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_PK[None, :, None, :]).flatten(3).type_as(x_NPHK)


class VisionAttention(nn.Module):
    """Bidirectional (no mask) multi-head attention with biased projections and 2D RoPE."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x_NPD: torch.Tensor, freqs_PK: torch.Tensor) -> torch.Tensor:
        shape = (*x_NPD.shape[:-1], self.num_heads, self.head_dim)
        q = rotate(self.q_proj(x_NPD).view(shape), freqs_PK).transpose(1, 2)
        k = rotate(self.k_proj(x_NPD).view(shape), freqs_PK).transpose(1, 2)
        v = self.v_proj(x_NPD).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(x_NPD.shape))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(c)
        self.mlp = VisionMLP(c)
        # NOTE: transformers builds these with LayerNorm's default eps (1e-5), not config.norm_eps
        self.input_layernorm = nn.LayerNorm(c.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size)

    def forward(self, x_NPD: torch.Tensor, freqs_PK: torch.Tensor) -> torch.Tensor:
        x_NPD = x_NPD + self.self_attn(self.input_layernorm(x_NPD), freqs_PK)
        return x_NPD + self.mlp(self.post_attention_layernorm(x_NPD))


class Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))


class PatchEmbedding(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_size = c.patch_size
        self.linear = nn.Linear(c.num_channels * c.patch_size ** 2, c.hidden_size, bias=False)

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        # channel-major patches (c, kh, kw), as nn.Unfold lays them out
        patches = F.unfold(pixels_NCHW, self.patch_size, stride=self.patch_size)
        return self.linear(patches.transpose(1, 2))


def pixel_shuffle(x_NPD: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, side², D] -> [N, (side·ratio)², D/ratio²]: neighbouring patches folded into channels."""
    n, p, d = x_NPD.shape
    side = int(p ** 0.5)
    x = x_NPD.view(n, side, int(side * ratio), int(d / ratio))
    x = x.permute(0, 2, 1, 3).reshape(n, int(side * ratio), int(side * ratio), int(d / ratio ** 2))
    return x.permute(0, 2, 1, 3).reshape(n, -1, int(d / ratio ** 2))


class AdapterMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.intermediate_size, c.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(c.projector_output_dim, c.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))  # GELU after both layers


class Adapter(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.mlp = AdapterMLP(c)


class VisionModel(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        num_positions = c.patches_per_side ** 2 + 1
        self.patch_embedding = PatchEmbedding(c)
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(num_positions, c.hidden_size))
        self.layernorm_pre = nn.LayerNorm(c.hidden_size)
        self.layernorm_post = nn.LayerNorm(c.hidden_size)
        self.model = Encoder(c)
        self.vision_adapter = Adapter(c)
        self.register_buffer("freqs_cis", vision_freqs_cis(c), persistent=False)

    def reset_buffers(self) -> None:  # after a build on the meta device
        self.freqs_cis = vision_freqs_cis(self.config).to(self.class_embedding.device)

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels_NCHW)
        cls = self.class_embedding.expand(x.shape[0], 1, x.shape[-1])
        x = self.layernorm_pre(torch.cat([x, cls], dim=1) + self.positional_embedding_vlm)  # class token last
        for layer in self.model.layers:
            x = layer(x, self.freqs_cis)
        x = self.layernorm_post(x)[:, :-1]  # drop the class token
        return self.vision_adapter.mlp(pixel_shuffle(x, self.config.pixel_shuffle_ratio))


class Projector(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.linear_1 = nn.Linear(c.vision_output_dim, c.text_hidden_size, bias=False)


class VisionTower(nn.Module):
    """Tiles -> the vectors that replace the `<|patch|>` embeddings, in tile order."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.vision_model = VisionModel(c)
        self.multi_modal_projector = Projector(c)

    @torch.inference_mode()
    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        """[N, C, S, S] tiles -> [N · tokens_per_tile, E]."""
        weight = self.multi_modal_projector.linear_1.weight
        features = self.vision_model(pixels_NCHW.to(weight.dtype))
        return self.multi_modal_projector.linear_1(features.reshape(-1, features.shape[-1]))
