"""Continuous batching: who runs in the next step, and with how many tokens.

Each step has a token budget (`max_num_batched_tokens`) and a cap on running sequences
(`max_num_seqs`). Running requests go first, in arrival order (a decode costs one token, an
unfinished prefill takes what the budget leaves: chunked prefill), then waiting requests are
admitted while budget, sequence slots and KV blocks last. When a running request cannot get its
blocks, the most recently arrived running request is preempted (blocks released, tokens kept) and
goes back to the front of the waiting queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.kv_cache import KVCacheManager
from workers.request import Request, RequestState


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
            n = min(req.num_uncomputed, budget)
            while not self.kv.allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                req.schedule(n)
                batch.requests.append(req)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing after it can run either
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs or batch.preempted:
                break
            if not req.ready:  # a later choice of an n > 1 request waits for the shared prompt
                continue
            if req.request_id not in self.kv.seqs:
                req.num_computed = self.kv.admit(req)
                req.num_cached_prompt = min(req.num_computed, req.num_prompt_tokens)
            n = min(req.num_uncomputed, budget)
            if not self.kv.allocate(req, n):
                break  # wait for blocks; running requests are never preempted for a newcomer
            self.waiting.remove(req)
            self.running.append(req)
            req.schedule(n)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.kv.free(victim.request_id)
        victim.preempt()
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)
