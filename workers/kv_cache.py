"""Paged KV cache with two layer groups and prefix caching.

Layers of one attention type (`chunked_attention` / `full_attention`) form a group with its own block
pool and block tables. Chunked layers see only the current fixed chunk, so once a sequence's next
position moves into a new chunk, the blocks wholly before it are released: a long sequence's memory
grows only with the full-attention layers. Any chunk size works with any block size: a block that
straddles a chunk boundary stays until the window has passed all of it.

Prefix caching: every full block is named by a hash of its tokens (and the digest of any image whose
tokens it holds) chained to its parent's hash (content + position), registered per group once
computed, and kept after release in an LRU of free blocks until the space is needed. A hit needs,
per group, the blocks the first uncached query will read: all of them for full layers, only those
in its chunk for chunked layers.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from model.batch import SequenceSlots
from model.config import CHUNKED, Llama4Config
from workers.request import Request

NO_BLOCK = -1


class BlockPool:
    """One group's blocks: reference counts, a free list in LRU order, the prefix-cache index."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free)
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)  # least recently released first
            h = self.hash_of[block]
            if h is not None:  # evict its cached content
                if self.cached.get(h) == block:
                    del self.cached[h]
                self.hash_of[block] = None
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def acquire_cached(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0
        if self.refs[block] == 0:
            self.free[block] = None

    def register(self, block: int, h: bytes) -> None:
        if self.hash_of[block] is None and h not in self.cached:
            self.hash_of[block] = h
            self.cached[h] = block

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)


@dataclass
class SequenceBlocks:
    tables: dict[str, list[int]]  # group -> block id per logical block (NO_BLOCK: released / none)
    hashes: list[bytes] = field(default_factory=list)  # chain over the request's full blocks
    num_registered: int = 0
    num_released_chunked: int = 0
    # group -> cache slot of every position computed so far (valid from the window start on),
    # kept across steps so a decode step converts one new position instead of the whole sequence
    slot_of: dict[str, torch.Tensor] = field(default_factory=dict)
    slots_filled: dict[str, int] = field(default_factory=dict)


@dataclass
class CacheStats:
    block_size: int
    blocks_total: dict[str, int]
    blocks_used: dict[str, int]
    bytes_per_block: dict[str, int]
    chunked_bytes_saved: int  # held by running sequences without chunk freeing, minus actually held
    prefix_hits_tokens: int
    prefix_queries_tokens: int
    chunked_blocks_released_total: int = 0


class KVCacheManager:
    def __init__(self, config: Llama4Config, num_blocks: dict[str, int], block_size: int,
                 bytes_per_block: dict[str, int], enable_prefix_caching: bool = True,
                 free_chunked_blocks: bool = True):
        self.block_size = block_size
        self.chunk = config.attention_chunk_size
        self.groups = sorted(num_blocks)
        self.pools = {g: BlockPool(n) for g, n in num_blocks.items()}
        self.bytes_per_block = bytes_per_block
        self.enable_prefix_caching = enable_prefix_caching
        self.free_chunked_blocks = free_chunked_blocks
        self.seqs: dict[str, SequenceBlocks] = {}
        self.prefix_hits_tokens = 0
        self.prefix_queries_tokens = 0
        self.chunked_blocks_released_total = 0  # released early by chunk-local freeing, since start

    def window_start(self, group: str, position: int) -> int:
        """First position whose K/V the query at `position` (or any later one) can still read."""
        if group == CHUNKED and self.free_chunked_blocks:
            return position // self.chunk * self.chunk
        return 0

    def max_blocks_needed(self, group: str, num_tokens: int) -> int:
        """Blocks one sequence of `num_tokens` can hold at once in `group` (for admission checks)."""
        if group == CHUNKED and self.free_chunked_blocks:
            return min(math.ceil(num_tokens / self.block_size), math.ceil(self.chunk / self.block_size) + 1)
        return math.ceil(num_tokens / self.block_size)

    # -- admission and prefix hits ------------------------------------------------------------

    def admit(self, req: Request) -> int:
        """Start tracking `req`, take its prefix-cache hits; returns the tokens already computed."""
        assert req.request_id not in self.seqs
        seq = SequenceBlocks({g: [] for g in self.groups})
        self.seqs[req.request_id] = seq
        self._extend_hashes(req, seq, (len(req.tokens) - 1) // self.block_size)
        # prompt logprobs need every prompt position computed, so such requests take no hits
        use_cache = self.enable_prefix_caching and req.params.prompt_logprobs is None
        hit_blocks = self._prefix_hit_blocks(seq) if use_cache else 0
        hit = hit_blocks * self.block_size
        for g in self.groups:
            lo = self.window_start(g, hit) // self.block_size
            table = seq.tables[g]
            for i in range(hit_blocks):
                if i < lo:
                    table.append(NO_BLOCK)
                    continue
                block = self.pools[g].cached[seq.hashes[i]]
                self.pools[g].acquire_cached(block)
                table.append(block)
        seq.num_registered = hit_blocks
        return hit

    def try_admit(self, req: Request, max_new: int, partial: bool) -> int:
        """Start `req`: its prefix hits, then blocks for its next `max_new` tokens; all or nothing.

        With `partial`, a prefill chunk shrinks to what the pools hold (the scheduler allows it when
        nothing else runs, so a request that fits alone always starts). Returns the new tokens it
        computes this step; 0 means it did not start and holds nothing.
        """
        hit = self.admit(req)
        req.num_computed = hit
        n = min(req.num_uncomputed, max_new)
        if partial:
            n = self.fit(req, n)
        if n == 0 or not self.allocate(req, n):
            self.free(req.request_id)  # a waiting request holds nothing: its hits stay evictable
            req.num_computed = 0
            return 0
        req.num_cached_prompt = min(hit, req.num_prompt_tokens)
        self.prefix_queries_tokens += len(req.tokens)
        self.prefix_hits_tokens += hit
        return n

    def _prefix_hit_blocks(self, seq: SequenceBlocks) -> int:
        full = [g for g in self.groups if g != CHUNKED or not self.free_chunked_blocks]
        k = len(seq.hashes)
        for g in full:  # every block from the start must be there
            run = 0
            while run < k and seq.hashes[run] in self.pools[g].cached:
                run += 1
            k = run
        if CHUNKED in self.groups and self.free_chunked_blocks:
            cached = self.pools[CHUNKED].cached
            while k > 0:  # only the blocks of the first uncached query's chunk must be there
                lo = self.window_start(CHUNKED, k * self.block_size) // self.block_size
                if all(seq.hashes[i] in cached for i in range(lo, k)):
                    break
                k -= 1
        return k

    def _extend_hashes(self, req: Request, seq: SequenceBlocks, num_blocks: int) -> None:
        B = self.block_size
        while len(seq.hashes) < num_blocks:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else b""
            data = array("q", req.tokens[i * B:(i + 1) * B]).tobytes()
            if req.image_spans:
                data += req.image_key(i * B, (i + 1) * B)
            seq.hashes.append(hashlib.blake2b(parent + data, digest_size=16).digest())

    # -- per step ---------------------------------------------------------------------------------

    def _missing(self, req: Request, num_new: int) -> dict[str, list[int]] | None:
        """Per group, the block indices to allocate for the next `num_new` tokens; None if short."""
        seq = self.seqs[req.request_id]
        end = req.num_computed + num_new
        plans = {}
        for g in self.groups:
            table = seq.tables[g]
            first = self.window_start(g, req.num_computed) // self.block_size
            last = (end - 1) // self.block_size
            missing = [i for i in range(first, last + 1) if i >= len(table) or table[i] == NO_BLOCK]
            if len(missing) > self.pools[g].num_free:
                return None
            plans[g] = missing
        return plans

    def fit(self, req: Request, num_new: int) -> int:
        """The most of the next `num_new` tokens whose blocks the pools can give now (0: none)."""
        if self._missing(req, num_new) is not None:
            return num_new
        lo, hi = 0, num_new - 1  # more tokens never need fewer blocks: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._missing(req, mid) is not None:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def allocate(self, req: Request, num_new: int) -> bool:
        """Make sure blocks cover the positions this step reads and writes; all or nothing."""
        plans = self._missing(req, num_new)
        if plans is None:
            return False
        seq = self.seqs[req.request_id]
        for g, missing in plans.items():
            table = seq.tables[g]
            for i, block in zip(missing, self.pools[g].allocate(len(missing))):
                table.extend([NO_BLOCK] * (i + 1 - len(table)))
                table[i] = block
        return True

    def slots(self, req: Request, num_new: int) -> SequenceSlots:
        seq = self.seqs[req.request_id]
        B = self.block_size
        end = req.num_computed + num_new
        out = {}
        for g in self.groups:
            start = self.window_start(g, req.num_computed)
            slot_of, filled = seq.slot_of.get(g), seq.slots_filled.get(g, 0)
            if slot_of is None or slot_of.numel() < end:
                grown = torch.empty(max(end, 2 * filled, 256), dtype=torch.long)
                if slot_of is not None:
                    grown[:filled] = slot_of[:filled]
                seq.slot_of[g] = slot_of = grown
            if filled < end:
                lo, table = max(filled, start), seq.tables[g]
                new = [table[p // B] * B + p % B for p in range(lo, end)]
                slot_of[lo:end] = torch.tensor(new, dtype=torch.long) if len(new) > 1 else new[0]
                seq.slots_filled[g] = end
            out[g] = (start, slot_of[start:end])
        return SequenceSlots(req.num_computed, num_new, out)

    def after_step(self, req: Request) -> None:
        """Register newly completed blocks in the prefix cache; release chunked blocks left behind."""
        seq = self.seqs[req.request_id]
        full_blocks = req.num_computed // self.block_size
        if self.enable_prefix_caching and full_blocks > seq.num_registered:
            self._extend_hashes(req, seq, full_blocks)
            for i in range(seq.num_registered, full_blocks):
                for g in self.groups:
                    table = seq.tables[g]
                    if i < len(table) and table[i] != NO_BLOCK:
                        self.pools[g].register(table[i], seq.hashes[i])
            seq.num_registered = full_blocks
        if CHUNKED in self.groups and self.free_chunked_blocks:
            table = seq.tables[CHUNKED]
            keep_from = self.window_start(CHUNKED, req.num_computed) // self.block_size
            for i in range(min(keep_from, len(table))):
                if table[i] != NO_BLOCK:
                    self.pools[CHUNKED].release(table[i])
                    table[i] = NO_BLOCK
                    seq.num_released_chunked += 1
                    self.chunked_blocks_released_total += 1

    def free(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return
        for g in self.groups:  # tail first, so a shared prefix is the last to be evicted
            for block in reversed(seq.tables[g]):
                if block != NO_BLOCK:
                    self.pools[g].release(block)

    def check_invariants(self, running: list[Request]) -> None:
        """The bookkeeping's promises (a debug switch: `EngineConfig.check_invariants`).

        Only running requests hold blocks; every block's reference count equals the table entries
        naming it; the free list is exactly the unreferenced blocks (cached content there stays
        evictable); the prefix index names blocks that still hold that content.
        """
        holders = {r.request_id for r in running}
        if set(self.seqs) != holders:
            raise AssertionError(f"blocks held by non-running requests {sorted(set(self.seqs) - holders)}, "
                                 f"running without blocks {sorted(holders - set(self.seqs))}")
        for g, pool in self.pools.items():
            refs = [0] * pool.num_blocks
            for seq in self.seqs.values():
                for block in seq.tables[g]:
                    if block != NO_BLOCK:
                        refs[block] += 1
            if refs != pool.refs:
                bad = [b for b in range(pool.num_blocks) if refs[b] != pool.refs[b]]
                raise AssertionError(f"{g}: reference counts disagree with the block tables at {bad[:8]}")
            if set(pool.free) != {b for b in range(pool.num_blocks) if refs[b] == 0}:
                raise AssertionError(f"{g}: the free list is not the set of unreferenced blocks")
            if any(pool.hash_of[b] != h for h, b in pool.cached.items()):
                raise AssertionError(f"{g}: the prefix index names a block that holds other content")

    def describe(self) -> str:
        """One line of the cache's state, for logs."""
        parts = [f"{g}: {p.num_used}/{p.num_blocks} blocks in use, {len(p.cached)} cached"
                 for g, p in self.pools.items()]
        return "; ".join(parts) + f"; {len(self.seqs)} sequences hold blocks"

    def stats(self) -> CacheStats:
        saved = sum(s.num_released_chunked for s in self.seqs.values())
        return CacheStats(
            block_size=self.block_size,
            blocks_total={g: p.num_blocks for g, p in self.pools.items()},
            blocks_used={g: p.num_used for g, p in self.pools.items()},
            bytes_per_block=dict(self.bytes_per_block),
            chunked_bytes_saved=saved * self.bytes_per_block.get(CHUNKED, 0),
            prefix_hits_tokens=self.prefix_hits_tokens,
            prefix_queries_tokens=self.prefix_queries_tokens,
            chunked_blocks_released_total=self.chunked_blocks_released_total,
        )


def plan_num_blocks(config: Llama4Config, budget_bytes: int, block_size: int, dtype_bytes: int,
                    max_num_seqs: int, max_num_batched_tokens: int, free_chunked_blocks: bool = True,
                    ) -> tuple[dict[str, int], dict[str, int]]:
    """Split a memory budget into blocks per group; returns (num_blocks, bytes_per_block).

    The chunked group gets what `max_num_seqs` sequences need at their widest window (plus one step's
    new tokens); everything else goes to the full group, whose needs grow with context.
    """
    per_layer = 2 * block_size * config.num_key_value_heads * config.head_dim * dtype_bytes
    layers = {g: config.layer_types.count(g) for g in set(config.layer_types)}
    bytes_per_block = {g: n * per_layer for g, n in layers.items()}
    if len(layers) == 1 or not free_chunked_blocks:
        total = sum(bytes_per_block.values())
        n = budget_bytes // total
        return {g: n for g in layers}, bytes_per_block
    window = math.ceil(config.attention_chunk_size / block_size) + 1
    chunked_need = max_num_seqs * window + math.ceil(max_num_batched_tokens / block_size) + max_num_seqs
    chunked = min(chunked_need, budget_bytes // 2 // bytes_per_block[CHUNKED])
    rest = budget_bytes - chunked * bytes_per_block[CHUNKED]
    full = [g for g in layers if g != CHUNKED][0]
    return {CHUNKED: chunked, full: rest // bytes_per_block[full]}, bytes_per_block
