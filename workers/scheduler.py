"""Continuous batching: who runs in the next step, and with how many tokens.

Each step has a token budget (`max_num_batched_tokens`) and a cap on running sequences
(`max_num_seqs`). Running requests go first, oldest first (a decode costs one token, an unfinished
prefill takes what the budget leaves: chunked prefill), then waiting requests are admitted in order
while budget, sequence slots and KV blocks last.

A request holds KV blocks only while it runs (vLLM's rule): admission takes prefix hits and the
step's blocks together or not at all, and a preempted request releases everything at once. When a
running request cannot get its blocks, its prefill chunk shrinks to what is free; if not even one
token fits, the newest running request is preempted (tokens kept, recomputed later from whatever the
prefix cache still holds) and goes back to the front of the waiting queue. So the oldest running
request always advances, and any request that fits the cache alone finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.kv_cache import KVCacheManager
from workers.request import Request


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_tokens: list[int]  # tokens each request computes this step
    preempted: list[Request]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Drop a request wherever it is (finished or aborted) and release its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def pending_tokens(self) -> int:
        return sum(r.num_uncomputed for r in self.running) + sum(r.num_uncomputed for r in self.waiting)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [], [])
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self.kv.fit(req, min(req.num_uncomputed, budget))
            while n == 0 and self.running[-1] is not req:
                self._preempt(self.running[-1], batch)
                n = self.kv.fit(req, min(req.num_uncomputed, budget))
            if n == 0:  # req is now the newest runner: it waits too (alone, only if too long for the cache)
                self._preempt(req, batch)
                break
            if not self.kv.allocate(req, n):
                raise RuntimeError(f"KV blocks for {req.request_id} vanished between fit and allocate")
            self._add(batch, req, n)
            budget -= n
            i += 1
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs or batch.preempted:
                break
            if not req.ready:  # a later choice of an n > 1 request waits for the shared prompt
                continue
            # running requests are never preempted for a newcomer; with nothing running, a prefill
            # chunk shrinks to the free blocks so that a request that fits alone always starts
            n = self.kv.try_admit(req, budget, partial=not self.running)
            if n == 0:
                break
            self.waiting.remove(req)
            self.running.append(req)
            self._add(batch, req, n)
            budget -= n
        return batch

    @staticmethod
    def _add(batch: ScheduledBatch, req: Request, n: int) -> None:
        req.schedule(n)
        batch.requests.append(req)
        batch.num_tokens.append(n)

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.kv.free(victim.request_id)
        victim.preempt()
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)
