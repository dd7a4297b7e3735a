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
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        slots = {g: n * kv.block_size for g, n in num_blocks.items()}
        self.cache = KVCache(model.config, slots, self.dtype, self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Forward the batch; final hidden states [T, D] and each request's rows [start, end)."""
        seqs, ids, rows = [], [], []
        offset = 0
        for req, n in zip(batch.requests, batch.num_tokens):
            seqs.append(self.kv.slots(req, n))
            ids.extend(req.tokens[req.num_computed:req.num_computed + n])
            rows.append((offset, offset + n))
            offset += n
        positions_T, meta = build_metadata(self.model.config, seqs)
        ids_T = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden_TD = self.model(ids_T, positions_T.to(self.device), meta.to(self.device), self.cache)
        return hidden_TD, rows

    @torch.inference_mode()
    def execute_empty(self) -> None:
        """A forward with no tokens: what a gang rank without work runs to join the collectives."""
        positions_T, meta = build_metadata(self.model.config, [])
        ids_T = torch.zeros(0, dtype=torch.long, device=self.device)
        self.model(ids_T, positions_T.to(self.device), meta.to(self.device), self.cache)

    @torch.inference_mode()
    def logits(self, hidden_TD: torch.Tensor, rows: list[int]) -> torch.Tensor:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden_TD[index]).float()
