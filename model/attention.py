"""Llama 4 attention over a flat token batch with a slot-addressed KV cache.

RoPE layers: interleaved RoPE, optional weightless qk-norm after it, chunked-local causal mask.
NoPE layers: no rotation, temperature tuning of q by absolute position, full causal mask.

Shape suffixes: T tokens, D hidden, H query heads, G kv heads, K head_dim, S slots, L keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.batch import AttentionMetadata, DecodeBatch, GroupMetadata
from model.config import Llama4Config
from model.layers import apply_rope, rms_normalize, temperature_scale


class KVCache:
    """K/V storage for every layer, head-major [G, S, K], slots numbered per layer group.

    Head-major so that gathering a batch's keys gives [G, B, L, K] blocks the attention matmuls use
    as they are, with no transposing copy.
    """

    def __init__(self, config: Llama4Config, num_slots: dict[str, int], dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for group in config.layer_types:
            shape = (config.num_key_value_heads, num_slots[group], config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.num_slots = dict(num_slots)


class Attention(nn.Module):
    def __init__(self, config: Llama4Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.use_rope = config.uses_rope(layer_idx)
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        self.eps = config.rms_norm_eps
        self.group = config.layer_types[layer_idx]
        d, hk, gk = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, hk, bias=False)
        self.k_proj = nn.Linear(d, gk, bias=False)
        self.v_proj = nn.Linear(d, gk, bias=False)
        self.o_proj = nn.Linear(hk, d, bias=False)
        self.qkv_proj: nn.Module | None = None

    def fuse(self) -> None:
        """Replace q, k and v by one projection (one GEMM), after loading."""
        fused = nn.Linear(self.q_proj.in_features, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                          bias=False)
        fused.weight.data = torch.cat([self.q_proj.weight.data, self.k_proj.weight.data, self.v_proj.weight.data])
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys together [T, H+G, K] (rotated and normed as one), values [T, G, K]."""
        T, gk = x_TD.shape[0], self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            qk, v = self.qkv_proj(x_TD).split([self.num_heads * self.head_dim + gk, gk], dim=-1)
        else:
            qk, v = torch.cat([self.q_proj(x_TD), self.k_proj(x_TD)], dim=-1), self.v_proj(x_TD)
        return qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim), v.view(T, self.num_kv_heads,
                                                                                       self.head_dim)

    def forward(self, x_TD: torch.Tensor, positions_T: torch.Tensor, freqs_cis_TK: torch.Tensor,
                meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        T = x_TD.shape[0]
        qk_TNK, v_TGK = self.project(x_TD)
        if self.use_rope:
            qk_TNK = apply_rope(qk_TNK, freqs_cis_TK)
        if self.use_qk_norm:
            qk_TNK = self.qk_norm(qk_TNK)
        q_THK, k_TGK = qk_TNK[:, :self.num_heads], qk_TNK[:, self.num_heads:]
        if self.temperature_tuning:
            scale_T = temperature_scale(positions_T, self.floor_scale, self.attn_scale)
            q_THK = (q_THK * scale_T[:, None, None]).to(q_THK.dtype)
        gm = meta.groups[self.group]
        k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]
        k_cache.index_copy_(1, gm.write_slots_T, k_TGK.transpose(0, 1))
        v_cache.index_copy_(1, gm.write_slots_T, v_TGK.transpose(0, 1))
        o_THK = self._attend(q_THK, k_cache, v_cache, gm)
        return self.o_proj(o_THK.reshape(T, self.num_heads * self.head_dim))

    def qk_norm(self, qk_TNK: torch.Tensor) -> torch.Tensor:
        return rms_normalize(qk_TNK, self.eps)

    def _attend(self, q_THK: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                gm: GroupMetadata) -> torch.Tensor:
        if gm.decode is not None and not gm.prefills:  # every token is a decode, in order
            return self._decode(q_THK, k_cache, v_cache, gm.decode)
        o_THK = torch.empty(q_THK.shape, dtype=q_THK.dtype, device=q_THK.device)
        if gm.decode is not None:
            d = gm.decode
            o_THK[d.token_index_B] = self._decode(q_THK.index_select(0, d.token_index_B), k_cache, v_cache, d)
        for p in gm.prefills:
            q_1HQK = q_THK[p.start:p.end].transpose(0, 1).unsqueeze(0)
            k_1GLK = gather(k_cache, p.kv_slots_L).unsqueeze(0)
            v_1GLK = gather(v_cache, p.kv_slots_L).unsqueeze(0)
            o_1HQK = F.scaled_dot_product_attention(
                q_1HQK, k_1GLK, v_1GLK, attn_mask=p.mask_QL, scale=self.scaling, enable_gqa=True)
            o_THK[p.start:p.end] = o_1HQK[0].transpose(0, 1)
        return o_THK

    def _decode(self, q_BHK: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                d: DecodeBatch) -> torch.Tensor:
        """One query per sequence. Each kv head serves its group of query heads without copying
        K/V (heads j*R .. (j+1)*R-1 share kv head j, as transformers' repeat_kv lays them out)."""
        k_GBLK, v_GBLK = gather(k_cache, d.kv_slots_BL), gather(v_cache, d.kv_slots_BL)
        B, H, K = q_BHK.shape
        G = self.num_kv_heads
        bias_BL = d.bias_BL.to(q_BHK.dtype)  # the metadata is built in fp32; bf16 kernels want their own dtype
        if B == 1:  # one sequence: the fused kernel wins; from a few on, two batched matmuls do
            return F.scaled_dot_product_attention(q_BHK[:, :, None, :], k_GBLK.transpose(0, 1),
                                                  v_GBLK.transpose(0, 1), attn_mask=bias_BL[:, None, None, :],
                                                  scale=self.scaling, enable_gqa=True)[:, :, 0]
        q_GBRK = q_BHK.view(B, G, H // G, K).transpose(0, 1)
        scores_GBRL = torch.matmul(q_GBRK, k_GBLK.transpose(-1, -2)) * self.scaling + bias_BL[None, :, None, :]
        # softmax in fp32, as transformers' eager attention does, then back to the cache dtype
        o_GBRK = torch.matmul(scores_GBRL.softmax(-1, dtype=torch.float32).to(v_GBLK.dtype), v_GBLK)
        return o_GBRK.transpose(0, 1).reshape(B, H, K)


def gather(cache_GSK: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """K or V of the cache at `slots` ([L] or [B, L]) as [G, L, K] or [G, B, L, K]."""
    G, _, K = cache_GSK.shape
    return cache_GSK.index_select(1, slots.reshape(-1)).view(G, *slots.shape, K)
