"""Turns a scheduled batch into the model's flat token batch, runs it, returns the logits to sample.

The only place where tensors are built from requests.
"""

from __future__ import annotations

from bisect import bisect_left

import torch

from model.attention import KVCache
from model.batch import build_metadata
from model.decoder import Llama4ForCausalLM
from model.vision import VisionTower
from workers.kv_cache import KVCacheManager
from workers.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: Llama4ForCausalLM, kv: KVCacheManager, num_blocks: dict[str, int],
                 vision: VisionTower | None = None):
        self.model = model
        self.vision = vision
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
        with_images = self.vision is not None and any(req.patch_positions for req in batch.requests)
        embeds = self._image_embeds(batch, rows) if with_images else None
        hidden_TD = self.model(ids_T, positions_T.to(self.device), meta.to(self.device), self.cache, embeds)
        return hidden_TD, rows

    def _image_embeds(self, batch: ScheduledBatch, rows: list[tuple[int, int]]):
        """(batch rows, feature vectors) of the `<|patch|>` tokens in this step's chunks. The tower runs
        once per step over every request that needs its images now; a request keeps its features until
        its chunks have passed its last patch (a preempted one computes them again)."""
        spans = []
        for req, n in zip(batch.requests, batch.num_tokens):
            pos = req.patch_positions
            lo, hi = bisect_left(pos, req.num_computed), bisect_left(pos, req.num_computed + n)
            spans.append((lo, hi))
        need = [req for req, (lo, hi) in zip(batch.requests, spans) if hi > lo and req.image_embeds is None]
        if need:
            tiles = torch.cat([im.pixel_values for req in need for im in req.images]).to(self.device)
            features = self.vision(tiles).split([len(req.patch_positions) for req in need])
            for req, f in zip(need, features):
                req.image_embeds = f
        index, vectors = [], []
        for req, (lo, hi), (start, _) in zip(batch.requests, spans, rows):
            if hi > lo:
                index += [start + p - req.num_computed for p in req.patch_positions[lo:hi]]
                vectors.append(req.image_embeds[lo:hi])
                if hi == len(req.patch_positions):
                    req.image_embeds = None
        if not index:
            return None
        return torch.tensor(index, dtype=torch.long, device=self.device), torch.cat(vectors)

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
