"""Our Llama 4 against transformers (the oracle): logits, incremental decode, greedy tokens, batching.

Checkpoints are written by `transformers.save_pretrained`, so the loader meets the real format.
"""

import pytest
import torch

import transformers
from model.batch import build_metadata
from model.generate import ContiguousCache, forward_step, greedy_generate
from model.loader import load_pretrained
from tests.oracle import (MAVERICK_LIKE, REFERENCE_TRANSFORMERS, SCOUT_LIKE, hf_greedy, hf_logits,
                          hf_model, hf_text_config, save_conditional)

TOL = 1e-4
GEN = torch.Generator().manual_seed(1234)
PROMPTS = [torch.randint(3, 128, (n,), generator=GEN).tolist() for n in (5, 13, 30, 21)]


def test_reference_version_is_pinned():
    assert transformers.__version__ == REFERENCE_TRANSFORMERS


@pytest.fixture(scope="module", params=["scout", "maverick"])
def pair(request, tmp_path_factory):
    base = SCOUT_LIKE if request.param == "scout" else MAVERICK_LIKE
    hf = hf_model(hf_text_config(base), seed=7)
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "scout":
        hf.save_pretrained(out)  # text-only Llama4ForCausalLM keys
    else:
        save_conditional(hf, out)  # Hub layout with language_model. keys and a vision tower
    return hf, load_pretrained(out)


def test_config_exercises_chunking_and_temperature(pair):
    _, ours = pair
    c = ours.config
    assert "chunked_attention" in c.layer_types and "full_attention" in c.layer_types
    assert c.attention_chunk_size <= 16 and c.floor_scale <= 8 and c.attn_temperature_tuning


def test_prefill_logits(pair):
    hf, ours = pair
    for prompt in PROMPTS:
        cache = ContiguousCache(ours, 1, 64)
        positions, meta = build_metadata(ours.config, [cache.slots(0, 0, len(prompt))])
        logits = ours.logits(ours(torch.tensor(prompt), positions, meta, cache.kv))
        assert (logits - hf_logits(hf, prompt)).abs().max().item() <= TOL


def test_incremental_decode_logits(pair):
    hf, ours = pair
    ids = PROMPTS[2] + PROMPTS[3]  # 51 tokens: several chunk boundaries
    ref = hf_logits(hf, ids)
    cache = ContiguousCache(ours, 1, 64)
    prefill = 6
    got = [forward_step(ours, cache, [ids[:prefill]], [0])[0]]
    for pos in range(prefill, len(ids)):
        got.append(forward_step(ours, cache, [[ids[pos]]], [pos])[0])
    diff = (torch.stack(got) - ref[prefill - 1:]).abs().max().item()
    assert diff <= TOL


def test_greedy_64_tokens_identical(pair):
    hf, ours = pair
    seen = set()
    for prompt in PROMPTS[:3]:
        expected = hf_greedy(hf, prompt, 64)
        seen.update(expected)
        assert greedy_generate(ours, [prompt], 64) == [expected]
    assert len(seen) > 10  # not a degenerate repetition that any bug would also produce


def test_batch_of_different_lengths_matches_each_alone(pair):
    hf, ours = pair
    expected = [hf_greedy(hf, p, 24) for p in PROMPTS]
    assert greedy_generate(ours, PROMPTS, 24) == expected


def test_eos_stops_generation(pair):
    hf, ours = pair
    expected = hf_greedy(hf, PROMPTS[0], 20)
    eos = expected[5]
    out = greedy_generate(ours, [PROMPTS[0]], 20, eos_ids={eos})[0]
    assert out == expected[:expected.index(eos) + 1]


def test_inference_rewrites_keep_the_oracle_tolerance(pair):
    """Fused projections and (on CPU, fp32) the decode kernels: same logits and tokens within 1e-4."""
    from model.kernel_modules import KERNEL_MODULES, KernelLinear
    from model.optimize import optimize_for_inference

    hf, ours = pair
    import copy

    fast = optimize_for_inference(copy.deepcopy(ours))
    assert isinstance(fast.model.layers[0].self_attn.qkv_proj, KernelLinear)
    # every module with a kernel version runs it (what production runs on CPU); `ours` stays plain torch
    kinds = {type(m) for m in fast.modules()}
    assert set(KERNEL_MODULES.values()) <= kinds and not set(KERNEL_MODULES) & kinds
    assert not set(KERNEL_MODULES.values()) & {type(m) for m in ours.modules()}
    for prompt in PROMPTS:
        cache = ContiguousCache(fast, 1, 64)
        positions, meta = build_metadata(fast.config, [cache.slots(0, 0, len(prompt))])
        logits = fast.logits(fast(torch.tensor(prompt), positions, meta, cache.kv))
        assert (logits - hf_logits(hf, prompt)).abs().max().item() <= TOL
    assert greedy_generate(fast, PROMPTS, 24) == [hf_greedy(hf, p, 24) for p in PROMPTS]


def test_inference_rewrites_without_the_kernels_keep_the_oracle_tolerance(pair, monkeypatch):
    """Where the CPU kernels cannot be built: oneDNN-prepacked Linears and the torch formulas."""
    import copy

    from model import cpu_kernels
    from model.optimize import PackedLinear, _onednn_available, optimize_for_inference

    hf, ours = pair
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    fast = optimize_for_inference(copy.deepcopy(ours))
    assert _onednn_available() and isinstance(fast.model.layers[0].self_attn.qkv_proj, PackedLinear)
    for prompt in PROMPTS:
        cache = ContiguousCache(fast, 1, 64)
        positions, meta = build_metadata(fast.config, [cache.slots(0, 0, len(prompt))])
        logits = fast.logits(fast(torch.tensor(prompt), positions, meta, cache.kv))
        assert (logits - hf_logits(hf, prompt)).abs().max().item() <= TOL
    assert greedy_generate(fast, PROMPTS, 24) == [hf_greedy(hf, p, 24) for p in PROMPTS]
