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
                 vision: VisionTower | None = None, microbatches: int = 1, microbatch_min_tokens: int = 16):
        self.model = model
        self.vision = vision
        self.kv = kv
        # ping-pong: a step of at least `microbatch_min_tokens` tokens (and two requests) runs as two
        # micro-batches whose MoE layers overlap; smaller steps lose more to the split than they gain
        self.microbatches, self.microbatch_min_tokens = microbatches, microbatch_min_tokens
        self.microbatched_steps = 0  # steps run as two micro-batches, since start
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        slots = {g: n * kv.block_size for g, n in num_blocks.items()}
        self.cache = KVCache(model.config, slots, self.dtype, self.device)

    def split(self, batch: ScheduledBatch) -> list[tuple[int, int]]:
        """This step's micro-batches as ranges of its requests: one, or two of about equal tokens."""
        # image rows index the whole batch: such a step stays one micro-batch
        cut = len(batch.requests) if self._with_images(batch) else self._cut(batch.num_tokens)
        return [(0, cut), (cut, len(batch.requests))] if cut < len(batch.requests) else [(0, cut)]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, parts: list[tuple[int, int]],
                microbatches: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Forward the batch as `parts`, padded with empty micro-batches to the `microbatches` a gang
        agreed; final hidden states [T, D] and each request's rows [start, end)."""
        rows, offset = [], 0
        for n in batch.num_tokens:
            rows.append((offset, offset + n))
            offset += n
        embeds = self._image_embeds(batch, rows) if self._with_images(batch) else None
        parts = parts + [(len(batch.requests), len(batch.requests))] * (microbatches - len(parts))
        inputs = [self._inputs(batch.requests[a:b], batch.num_tokens[a:b], embeds if a == 0 else None)
                  for a, b in parts]
        if microbatches == 1:
            return self.model(*inputs[0][:3], self.cache, inputs[0][3]), rows
        self.microbatched_steps += 1
        return torch.cat(self.model.forward_microbatches(inputs, self.cache)), rows

    def _with_images(self, batch: ScheduledBatch) -> bool:
        return self.vision is not None and any(req.patch_positions for req in batch.requests)

    def _cut(self, num_tokens: list[int]) -> int:
        """Where this step would split into two micro-batches of about equal tokens (at a request
        boundary); len(num_tokens) when it stays whole."""
        total = sum(num_tokens)
        if self.microbatches < 2 or len(num_tokens) < 2 or total < self.microbatch_min_tokens:
            return len(num_tokens)
        running = 0
        for i, n in enumerate(num_tokens):
            if running + n / 2 >= total / 2:
                return max(1, i)
            running += n
        return len(num_tokens) - 1

    def _inputs(self, requests, num_tokens, embeds) -> tuple:
        seqs, ids = [], []
        for req, n in zip(requests, num_tokens):
            seqs.append(self.kv.slots(req, n))
            ids.extend(req.tokens[req.num_computed:req.num_computed + n])
        positions_T, meta = build_metadata(self.model.config, seqs)
        ids_T = torch.tensor(ids, dtype=torch.long, device=self.device)
        return ids_T, positions_T.to(self.device), meta.to(self.device), embeds

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
    def execute_empty(self, microbatches: int) -> None:
        """A forward with no tokens: what a gang rank without work runs to join the collectives (as
        many empty micro-batches as the gang agreed)."""
        inputs = [self._inputs([], [], None) for _ in range(microbatches)]
        if microbatches == 1:
            self.model(*inputs[0][:3], self.cache)
        else:
            self.model.forward_microbatches(inputs, self.cache)

    @torch.inference_mode()
    def logits(self, hidden_TD: torch.Tensor, rows: list[int]) -> torch.Tensor:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden_TD[index]).float()
