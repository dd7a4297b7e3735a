"""The scheduler and the KV cache together under random load, without a model (hypothesis).

A simulated model stands in for the forward pass: it writes each computed position's token into the
cache slots the KV manager gave it, checks that every slot it reads (the attention window of each
layer group) holds this sequence's token at that position, and "samples" a token that depends only on
the tokens so far. So preemption, recompute, prefix hits and chunk-local freeing must hand every
sequence exactly its own K/V, and outputs must equal those of a run with an unlimited cache.
"""

import dataclasses
import os
import random

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import CHUNKED, FULL, preset
from workers.kv_cache import KVCacheManager, plan_num_blocks
from workers.request import Request
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler

VOCAB = 50


def next_token(tokens: list[int]) -> int:
    return (tokens[-1] * 31 + len(tokens) * 7 + (tokens[-2] if len(tokens) > 1 else 3)) % VOCAB


def expected_outputs(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


@dataclasses.dataclass
class Arrival:
    step: int
    prompt: list[int]
    max_tokens: int
    n: int
    abort_after: int | None  # steps after arrival


class Simulation:
    """Drives `Scheduler` + `KVCacheManager` the way `LLMEngine.step` does, with a fake model."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, budget: int):
        self.kv = kv
        self.sched = Scheduler(kv, max_num_seqs, budget)
        self.content = {g: {} for g in kv.groups}  # group -> slot -> (position, token)
        self.choices: dict[str, list[Request]] = {}
        self.num_steps = self.num_preempted = 0

    def submit(self, rid: str, arrival: Arrival) -> None:
        params = SamplingParams(max_tokens=arrival.max_tokens, n=arrival.n)
        choices = []
        for i in range(arrival.n):
            choices.append(Request(f"{rid}#{i}", list(arrival.prompt), params, arrival.max_tokens, parent_id=rid,
                                   index=i, first_sibling=choices[0] if choices else None))
        self.choices[rid] = choices
        for req in choices:
            self.sched.add(req)

    def abort(self, rid: str) -> None:
        for req in self.choices[rid]:
            if not req.state.done:
                req.finish("abort")
                self.sched.remove(req)

    def step(self) -> int:
        batch = self.sched.schedule()
        self.num_preempted += len(batch.preempted)
        for req, n in zip(batch.requests, batch.num_tokens):
            self._forward(req, n)
        for req, n in zip(batch.requests, batch.num_tokens):
            if req.computed(n):
                req.append_token(next_token(req.tokens))
            self.kv.after_step(req)
            if len(req.output_token_ids) >= req.max_tokens:
                req.finish("length")
                self.sched.remove(req)
        self.num_steps += 1
        self.kv.check_invariants(self.sched.running)
        return batch.total_tokens

    def _forward(self, req: Request, n: int) -> None:
        slots = self.kv.slots(req, n)
        for g in self.kv.groups:
            start, slot_ids = slots.slots[g]
            slot_ids = slot_ids.tolist()
            first = req.num_computed
            for p in range(first, first + n):  # write the new positions
                self.content[g][slot_ids[p - start]] = (p, req.tokens[p])
            # every query reads its window: full layers from 0, chunked layers from the chunk start
            lo = self.kv.window_start(g, first)
            for p in range(lo, first + n):
                assert self.content[g].get(slot_ids[p - start]) == (p, req.tokens[p]), (
                    f"{req.request_id}: {g} slot of position {p} holds another sequence's K/V")


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([2, 3, 4, 8]))
    chunk = draw(st.sampled_from([4, 6, 8, 12]))
    prefixes = [draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)) for _ in range(2)]
    arrivals = []
    for _ in range(draw(st.integers(1, 10))):
        head = draw(st.sampled_from(prefixes + [[]]))
        tail = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1 if not head else 0, max_size=30))
        arrivals.append(Arrival(step=draw(st.integers(0, 15)), prompt=head + tail,
                                max_tokens=draw(st.integers(1, 24)), n=draw(st.sampled_from([1, 1, 2, 3])),
                                abort_after=draw(st.none() | st.integers(0, 30))))
    return {"block_size": block_size, "chunk": chunk, "arrivals": arrivals,
            "budget": draw(st.integers(1, 64)), "max_num_seqs": draw(st.integers(1, 8)),
            "spare": {g: draw(st.integers(0, 12)) for g in (CHUNKED, FULL)},
            "prefix_caching": draw(st.booleans()), "free_chunked": draw(st.booleans())}


@settings(max_examples=int(os.environ.get("MAVERICK_HYPOTHESIS_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_every_request_finishes_exactly_with_invariants_after_every_step(w):
    config = dataclasses.replace(preset("debug"), attention_chunk_size=w["chunk"])
    B, longest = w["block_size"], max(len(a.prompt) + a.max_tokens for a in w["arrivals"])
    probe = KVCacheManager(config, {CHUNKED: 1, FULL: 1}, B, {CHUNKED: 1, FULL: 1},
                           free_chunked_blocks=w["free_chunked"])
    # from "holds the longest request alone" up
    blocks = {g: probe.max_blocks_needed(g, longest) + w["spare"][g] for g in (CHUNKED, FULL)}
    kv = KVCacheManager(config, blocks, B, {CHUNKED: 1, FULL: 1}, enable_prefix_caching=w["prefix_caching"],
                        free_chunked_blocks=w["free_chunked"])
    sim = Simulation(kv, w["max_num_seqs"], w["budget"])
    pending = sorted(enumerate(w["arrivals"]), key=lambda ia: ia[1].step)
    aborts: dict[int, list[str]] = {}
    step_limit = 20 + 2 * longest * sum(a.n for a in w["arrivals"])  # the oldest runner always advances
    while pending or any(not r.state.done for cs in sim.choices.values() for r in cs):
        while pending and pending[0][1].step <= sim.num_steps:
            i, a = pending.pop(0)
            sim.submit(f"r{i}", a)
            if a.abort_after is not None:
                aborts.setdefault(sim.num_steps + a.abort_after, []).append(f"r{i}")
        for rid in aborts.pop(sim.num_steps, []):
            sim.abort(rid)
        runnable = any(r.ready for r in [*sim.sched.waiting, *sim.sched.running])
        computed = sim.step()
        if runnable:
            assert computed > 0, f"step {sim.num_steps} scheduled nothing: {kv.describe()}"
        assert sim.num_steps < step_limit, f"no end after {step_limit} steps: {kv.describe()}"
    for rid, choices in sim.choices.items():
        for req in choices:
            want = expected_outputs(req.prompt_token_ids, req.max_tokens)
            if req.finish_reason == "length":
                assert req.output_token_ids == want
            else:  # aborted: whatever it had is a prefix of the full answer
                assert req.finish_reason == "abort" and want[:len(req.output_token_ids)] == req.output_token_ids
    assert not kv.seqs
    for g, pool in kv.pools.items():
        assert pool.num_used == 0, f"{g}: {pool.num_used} blocks leaked"


def stall_config():
    """The reported case: 6 layers (4 chunked, chunk 12; 2 full), 3 KV heads of 16 dims, fp32."""
    return dataclasses.replace(preset("debug"), num_hidden_layers=6, no_rope_layer_interval=3, no_rope_layers=None,
                               layer_types=None, moe_layers=None, num_attention_heads=6, num_key_value_heads=3,
                               attention_chunk_size=12)


@pytest.mark.parametrize("budget", [16, 1024])
@pytest.mark.parametrize("seed", range(6))
def test_the_reported_stall_finishes(budget, seed):
    """600 kB of KV (12 chunked + 24 full blocks of 16), 8 requests of 3-140 prompt tokens arriving over
    a few steps, 40 tokens each: the old scheduler left all 8 stuck with the full pool held by waiters."""
    config = stall_config()
    num_blocks, bytes_per_block = plan_num_blocks(config, 600_000, 16, 4, 32, budget)
    assert num_blocks == {CHUNKED: 12, FULL: 24}
    kv = KVCacheManager(config, num_blocks, 16, bytes_per_block)
    sim = Simulation(kv, 32, budget)
    rng = random.Random(seed)
    arrivals = sorted((rng.randrange(6), i) for i in range(8))
    for _ in range(2000):
        while arrivals and arrivals[0][0] <= sim.num_steps:
            i = arrivals.pop(0)[1]
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 141))]
            sim.submit(f"r{i}", Arrival(0, prompt, 40, 1, None))
        if not arrivals and not sim.sched.num_unfinished:
            break
        sim.step()
    assert not sim.sched.num_unfinished, kv.describe()
    for (req,) in sim.choices.values():
        assert req.output_token_ids == expected_outputs(req.prompt_token_ids, 40)
