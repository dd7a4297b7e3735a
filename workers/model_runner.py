"""Turns a scheduled batch into the model's flat token batch, runs it, returns the logits to sample.

The only place where tensors are built from requests.
"""

from __future__ import annotations

import torch

from model.attention import KVCache
from model.batch import build_metadata
from model.decoder import Llama4ForCausalLM
from workers.kv_cache import KVCacheManager
from workers.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: Llama4ForCausalLM, kv: KVCacheManager, num_blocks: dict[str, int]):
        self.model = model
        self.kv = kv
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        slots = {g: n * kv.block_size for g, n in num_blocks.items()}
        self.cache = KVCache(model.config, slots, self.dtype, self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, sample_mask: list[bool]) -> torch.Tensor:
        """Forward the batch; logits [N, V] of the last token of each request with `sample_mask`."""
        seqs, ids, last_rows = [], [], []
        offset = 0
        for req, n, sample in zip(batch.requests, batch.num_tokens, sample_mask):
            seqs.append(self.kv.slots(req, n))
            ids.extend(req.tokens[req.num_computed:req.num_computed + n])
            offset += n
            if sample:
                last_rows.append(offset - 1)
        positions_T, meta = build_metadata(self.model.config, seqs)
        ids_T = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden_TD = self.model(ids_T, positions_T.to(self.device), meta.to(self.device), self.cache)
        rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden_TD[rows]).float()
