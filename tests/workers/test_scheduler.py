"""The scheduler on its own: budgets, chunked prefill, admission order, preemption."""

from model.config import CHUNKED, FULL, preset
from workers.kv_cache import KVCacheManager
from workers.request import Request, RequestState
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler

CONFIG = preset("debug")


def scheduler(full_blocks=100, max_num_seqs=8, budget=16):
    kv = KVCacheManager(CONFIG, {CHUNKED: 100, FULL: full_blocks}, 4, {CHUNKED: 1, FULL: 1},
                        enable_prefix_caching=False)
    return Scheduler(kv, max_num_seqs, budget)


def req(rid, n):
    return Request(rid, [1] * n, SamplingParams(), max_tokens=100)


def finish_step(sched, batch):
    """What the engine does after the forward: account tokens, sample one where the prompt is done."""
    for r, n in zip(batch.requests, batch.num_tokens):
        if r.computed(n):
            r.append_token(7)
        sched.kv.after_step(r)


def test_chunked_prefill_splits_long_prompt_and_mixes_with_decodes():
    s = scheduler(budget=16)
    a, b = req("a", 5), req("b", 40)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert [(r.request_id, n) for r, n in zip(batch.requests, batch.num_tokens)] == [("a", 5), ("b", 11)]
    finish_step(s, batch)
    assert a.state is RequestState.DECODE and b.state is RequestState.PREFILL
    batch = s.schedule()
    assert batch.num_tokens == [1, 15] and batch.total_tokens == 16  # decode first, then the chunk
    finish_step(s, batch)
    batch = s.schedule()
    assert batch.num_tokens == [1, 14]
    finish_step(s, batch)
    assert b.state is RequestState.DECODE and b.output_token_ids == [7]


def test_max_num_seqs_and_fcfs_admission():
    s = scheduler(max_num_seqs=2, budget=100)
    for i in range(4):
        s.add(req(f"r{i}", 3))
    batch = s.schedule()
    assert [r.request_id for r in batch.requests] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2", "r3"]


def test_preemption_takes_the_latest_arrival_and_resumes_it_first():
    s = scheduler(full_blocks=6, budget=100)  # blocks of 4 tokens: 24 tokens in the full group
    a, b = req("a", 8), req("b", 8)
    s.add(a)
    s.add(b)
    # blocks of 4: each needs a 3rd block at position 8 (6 in use: the pool is full), and a 4th
    # at position 12, which only preempting the other can give
    for _ in range(10):
        batch = s.schedule()
        finish_step(s, batch)
        if batch.preempted:
            break
    assert [r.request_id for r in batch.preempted] == ["b"]
    assert b.state is RequestState.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert s.waiting[0] is b and "b" not in s.kv.seqs
    assert len(b.tokens) > 8  # its generated tokens are kept and will be recomputed
    s.remove(a)  # a finishes: b is admitted again and recomputes prompt + outputs
    batch = s.schedule()
    assert batch.requests == [b] and batch.num_tokens == [len(b.tokens)]


def test_running_requests_are_not_preempted_for_newcomers():
    s = scheduler(full_blocks=3, budget=100)
    a = req("a", 8)
    s.add(a)
    finish_step(s, s.schedule())
    s.add(req("late", 8))
    batch = s.schedule()
    assert batch.requests == [a] and not batch.preempted
    assert s.waiting[0].request_id == "late"
