"""Reference greedy generation with a simple contiguous per-sequence KV cache.

Every prompt runs in one flat, unpadded batch: the first step prefills all prompts together, the
next steps decode one token per unfinished sequence. Sequence i owns slots
[i * max_len, (i + 1) * max_len) in every layer group. The serving engine (`workers/`) replaces this
with paged blocks behind the same `SequenceSlots` interface.
"""

from __future__ import annotations

import torch

from model.attention import KVCache
from model.batch import SequenceSlots, build_metadata
from model.decoder import Llama4ForCausalLM


class ContiguousCache:
    def __init__(self, model: Llama4ForCausalLM, num_seqs: int, max_len: int):
        self.max_len = max_len
        groups = set(model.config.layer_types)
        dtype = model.lm_head.weight.dtype
        device = model.lm_head.weight.device
        self.kv = KVCache(model.config, {g: num_seqs * max_len for g in groups}, dtype, device)
        self.groups = groups

    def slots(self, seq: int, num_cached: int, num_new: int) -> SequenceSlots:
        end = num_cached + num_new
        if end > self.max_len:
            raise ValueError(f"sequence {seq} needs {end} positions, the cache holds {self.max_len}")
        base = seq * self.max_len
        rng = torch.arange(base, base + end)
        return SequenceSlots(num_cached, num_new, {g: (0, rng) for g in self.groups})


def forward_step(model: Llama4ForCausalLM, cache: ContiguousCache, tokens: list[list[int]],
                 num_cached: list[int]) -> torch.Tensor:
    """Run one flat batch (tokens[i] are sequence i's new tokens); logits of each sequence's last token."""
    seqs = [cache.slots(i, num_cached[i], len(t)) for i, t in enumerate(tokens)]
    positions_T, meta = build_metadata(model.config, seqs)
    device = cache.kv.k[0].device
    ids_T = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long, device=device)
    hidden_TD = model(ids_T, positions_T.to(device), meta.to(device), cache.kv)
    lengths = torch.tensor([len(t) for t in tokens])
    last_rows = (lengths.cumsum(0) - 1)[lengths > 0]
    return model.logits(hidden_TD[last_rows.to(hidden_TD.device)])


def greedy_generate(model: Llama4ForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                    eos_ids: set[int] | frozenset[int] = frozenset()) -> list[list[int]]:
    """New tokens per prompt (EOS included when reached), all prompts batched together."""
    max_len = max(len(p) for p in prompts) + max_new_tokens
    cache = ContiguousCache(model, len(prompts), max_len)
    outputs: list[list[int]] = [[] for _ in prompts]
    pending = [list(p) for p in prompts]
    cached = [0] * len(prompts)
    done = [max_new_tokens == 0] * len(prompts)
    while not all(done):
        step = [pending[i] if not done[i] else [] for i in range(len(prompts))]
        logits = forward_step(model, cache, step, cached)
        live = [i for i in range(len(prompts)) if not done[i]]
        for row, i in enumerate(live):
            cached[i] += len(step[i])
            token = int(logits[row].argmax())
            outputs[i].append(token)
            pending[i] = [token]
            done[i] = token in eos_ids or len(outputs[i]) >= max_new_tokens
    return outputs
