"""Each building block against its formula (LLAMA4.md §3) and, where one exists, against transformers."""

import math

import pytest
import torch

from model.attention import Attention, KVCache
from model.batch import SequenceSlots, build_metadata, visible_mask
from model.config import RopeScaling, preset
from model.layers import MLP, RMSNorm, RotaryEmbedding, apply_rope, rms_normalize, rope_inv_freq, temperature_scale

torch.manual_seed(0)


def test_rmsnorm_formula_and_cast_before_weight():
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    xb = x.bfloat16()
    out = norm.to(torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rms_normalize(xb, 1e-5) * norm.weight)


def test_qk_norm_is_rms_not_unit_l2():
    x = torch.randn(5, 4, 16)
    y = rms_normalize(x, 1e-5)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((5, 4), 4.0), rtol=1e-4, atol=1e-4)


def test_rope_rotates_interleaved_pairs():
    inv_freq = rope_inv_freq(8, 10000.0, RopeScaling())
    positions = torch.tensor([0, 3, 17])
    freqs = torch.polar(torch.ones(3, 4), positions[:, None].float() * inv_freq)
    x = torch.randn(3, 2, 8)
    out = apply_rope(x, freqs)
    angle = positions[:, None, None].float() * inv_freq  # (T, 1, K/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], even * torch.cos(angle) - odd * torch.sin(angle))
    torch.testing.assert_close(out[..., 1::2], even * torch.sin(angle) + odd * torch.cos(angle))
    torch.testing.assert_close(out[0], x[0])  # position 0 is the identity


def test_default_inv_freq_formula():
    inv = rope_inv_freq(128, 500000.0, RopeScaling())
    expected = torch.tensor([1.0 / 500000.0 ** (2 * i / 128) for i in range(64)])
    torch.testing.assert_close(inv, expected)


@pytest.mark.parametrize("low,high", [(1.0, 4.0), (1.0, 1.0)])
def test_llama3_scaling_bands(low, high):
    scaling = RopeScaling(rope_type="llama3", factor=16.0, low_freq_factor=low, high_freq_factor=high,
                          original_max_position_embeddings=8192)
    base = rope_inv_freq(128, 500000.0, RopeScaling())
    inv = rope_inv_freq(128, 500000.0, scaling)
    for i in range(64):
        wavelen = 2 * math.pi / base[i].item()
        if wavelen < 8192 / high:
            assert inv[i] == base[i]
        elif wavelen > 8192 / low:
            torch.testing.assert_close(inv[i], base[i] / 16)
        else:
            smooth = (8192 / wavelen - low) / (high - low)
            torch.testing.assert_close(inv[i], (1 - smooth) * base[i] / 16 + smooth * base[i])
    if low == high:  # Scout-Instruct: indices >= 35 divided by 16, the rest unchanged
        assert torch.equal(inv[:35], base[:35])
        torch.testing.assert_close(inv[35:], base[35:] / 16)


def test_llama3_inv_freq_equals_transformers():
    from transformers import Llama4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    hf = Llama4TextConfig(head_dim=32, rope_theta=500000.0, rope_scaling=dict(params))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    ours = rope_inv_freq(32, 500000.0, RopeScaling(**params))
    assert torch.equal(ours, ref)


def test_temperature_scale_by_absolute_position():
    s = temperature_scale(torch.tensor([0, 6, 7, 8190, 8191, 16383]), 8192, 0.1)
    expected = [1.0, 1.0, 1.0, 1.0, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3)]
    torch.testing.assert_close(s, torch.tensor(expected))
    assert temperature_scale(torch.tensor([3]), 4, 0.1).item() == pytest.approx(1 + 0.1 * math.log(2))


def test_chunked_mask_uses_fixed_aligned_chunks():
    q = torch.arange(0, 12)
    mask = visible_mask(q, torch.arange(0, 12), chunk=4)
    for i in range(12):
        for j in range(12):
            assert mask[i, j] == (j <= i and j // 4 == i // 4)
    assert torch.equal(visible_mask(q, q, None), torch.tril(torch.ones(12, 12, dtype=torch.bool)))


def test_mlp_swiglu():
    mlp = MLP(8, 12)
    x = torch.randn(4, 8)
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(mlp(x), expected)


def _naive_attention(attn: Attention, x, positions, chunk):
    """Eager formula of LLAMA4.md §3.4 for one unpadded sequence, no cache."""
    T, H, G, K = x.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(T, H, K)
    k = attn.k_proj(x).view(T, G, K)
    v = attn.v_proj(x).view(T, G, K)
    if attn.use_rope:
        freqs = RotaryEmbedding(preset("debug")).freqs_cis(positions)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        if attn.use_qk_norm:
            q, k = rms_normalize(q, attn.eps), rms_normalize(k, attn.eps)
    else:
        q = q * temperature_scale(positions, attn.floor_scale, attn.attn_scale)[:, None, None]
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    w = torch.einsum("thk,shk->hts", q, k) * K**-0.5
    mask = visible_mask(positions, positions, chunk if attn.use_rope else None)
    w = w + torch.where(mask, 0.0, torch.finfo(w.dtype).min)
    o = torch.einsum("hts,shk->thk", torch.softmax(w, -1), v)
    return attn.o_proj(o.reshape(T, H * K))


@pytest.mark.parametrize("layer", [0, 1])  # debug preset: layer 0 RoPE+chunked, layer 1 NoPE+full
def test_attention_layer_matches_formula_in_prefill_and_decode(layer):
    config = preset("debug")
    attn = Attention(config, layer).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    T = 21
    x, positions = torch.randn(T, config.hidden_size), torch.arange(T)
    expected = _naive_attention(attn, x, positions, config.attention_chunk_size)
    cache = KVCache(config, {g: 64 for g in set(config.layer_types)}, torch.float32)
    slots = torch.arange(10, 10 + T)  # not starting at 0: slots are an address, not a position
    out = torch.empty_like(expected)
    with torch.no_grad():
        for lo, hi in ((0, 9), (9, 10), (10, 18), (18, 19), (19, 20), (20, 21)):
            seq = SequenceSlots(lo, hi - lo, {g: (0, slots[:hi]) for g in set(config.layer_types)})
            pos, meta = build_metadata(config, [seq])
            rope = RotaryEmbedding(config).freqs_cis(pos)
            out[lo:hi] = attn(x[lo:hi], pos, rope, meta, cache)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
