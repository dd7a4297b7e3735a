"""Small Llama 4 building blocks: RMSNorm, qk-norm, interleaved RoPE with llama3 scaling, SwiGLU MLP.

Shape suffixes: T tokens, D hidden, H heads, K head_dim, F MLP width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Llama4Config, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: cast back to the input dtype before the weight multiply, as transformers does
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation over the last dim in fp32 (also Llama 4's per-head qk-norm):
    x * rsqrt(mean(x^2) + eps), computed in fp32 and cast back, as one fused op."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [K/2] in fp32, with the llama3 long-context rescaling when configured."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling.rope_type != "llama3":
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    orig = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = orig / low, orig / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    # NOTE: low == high divides by zero here; those values are only used where wavelen is
    # exactly the boundary, which never happens (LLAMA4.md §3.4.2).
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Complex rotation of interleaved pairs (x[2i], x[2i+1]), GPT-J style, fp32 math."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        self.params = (config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", rope_inv_freq(*self.params), persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = rope_inv_freq(*self.params).to(self.inv_freq.device)

    def freqs_cis(self, positions_T: torch.Tensor) -> torch.Tensor:
        freqs_TK = positions_T[:, None].float() * self.inv_freq.float()  # (T, K/2)
        return torch.polar(torch.ones_like(freqs_TK), freqs_TK)  # complex64


def apply_rope(x_THK: torch.Tensor, freqs_cis_TK: torch.Tensor) -> torch.Tensor:
    xc = torch.view_as_complex(x_THK.float().reshape(*x_THK.shape[:-1], x_THK.shape[-1] // 2, 2))  # (T, H, K/2)
    return torch.view_as_real(xc * freqs_cis_TK[:, None, :]).flatten(2).type_as(x_THK)


def temperature_scale(positions_T: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Attention temperature tuning of NoPE layers, by absolute position; fp32 [T]."""
    return torch.log1p(torch.floor((positions_T.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and the shared expert.

    `fuse()` replaces gate and up by one [2F, D] projection (one GEMM), after loading.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.gate_up_proj: nn.Module | None = None

    def fuse(self) -> None:
        fused = nn.Linear(self.gate_proj.in_features, 2 * self.gate_proj.out_features, bias=False)
        fused.weight.data = torch.cat([self.gate_proj.weight.data, self.up_proj.weight.data])
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x_TD).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))
