"""Gangs on a real 3-node Ray cluster: the same tokens as one process and as transformers, ranks
spread over nodes, a failed rank's gang comes back keeping its survivors, idle is idle; a rank that
stops answering mid-step is declared hung by the ranks kept waiting for it (the step watchdog), not by
the periodic health check, and a machine whose cores another process saturates declares nothing; a
warm spare takes a failed expert rank's place, and nothing outlives the gang; a gang written down
(as under Serve) outlives its supervisor: the next one takes it over, and with none it removes itself."""

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import ray
import torch

from cluster.config import EngineLimits, GangConfig, RankResources
from cluster.probe import wait_until
from cluster.startup import STAGES, open_board
from cluster.gang import build_gang
from cluster.supervisor import GangSupervisor
from tests.cluster.conftest import CHUNK
from tests.oracle import hf_greedy
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import InvalidRequest, Unavailable
from workers.expert_parallel import Placement
from workers.llm import LLM
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

RANK = RankResources(num_cpus=0.25, torch_threads=1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=2 * CHUNK, ignore_eos=True)


def gang_config(ckpt, attention, experts, **kw):
    return GangConfig(model=str(ckpt), attention_workers=attention, expert_workers=experts,
                      placement_strategy="SPREAD", attention=RANK, experts=RANK, skip_tokenizer_init=True,
                      engine=EngineLimits(block_size=8, kv_cache_memory=16 * 2**20), collective_timeout_s=20, **kw)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(5, 35, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


async def collect(supervisor, prompt, params=GREEDY, started: asyncio.Event | None = None):
    """The request's token ids, finish reason and error; `started` is set at its first token."""
    ids, finish, error = [], None, None
    async for out in supervisor.generate(GenerateRequest(prompt, params)):
        ids += out.new_token_ids
        if started is not None and ids:
            started.set()
        finish, error = out.finish_reason, out.error or error
    return ids, finish, error


async def rebuilt(supervisor, timeout_s: float = 120) -> None:
    """Until the supervisor has restarted its gang and serves again."""
    for _ in range(int(timeout_s / 0.5)):
        if supervisor.restarts and supervisor.ready():
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the gang was not rebuilt within {timeout_s:g}s")


@pytest.fixture(scope="module")
def reference(gang_checkpoint):
    ckpt, hf = gang_checkpoint
    ps = prompts(6)
    engine = LLMEngine.from_model_dir(ckpt, EngineConfig(block_size=8), skip_tokenizer_init=True)
    single = [r.outputs[0].token_ids for r in LLM(engine=engine).generate(ps, GREEDY)]
    assert single[:2] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in ps[:2]]
    return ps, single


# (2, 1) and (2, 4) run in the micro-batch test below, whose steps are also whole when only one request
# runs; one expert rank (1, 1) is served exactly in tests/router/test_gangs.py and test_autoscaling.py
@pytest.mark.parametrize("attention,experts", [(1, 2), (1, 3)])
def test_gang_equals_single_process(ray_cluster, gang_checkpoint, reference, attention, experts):
    ckpt, _ = gang_checkpoint
    ps, single = reference

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, attention, experts))
        await supervisor.start()
        try:
            nodes = set(ray.get([r.node_id.remote() for r in supervisor.gang.ranks]))
            results = await asyncio.gather(*(collect(supervisor, p) for p in ps))
            loads = supervisor.gang.loads
            per_worker = [s["steps"] for s in await asyncio.gather(*[a.stats.remote()
                                                                     for a in supervisor.gang.attention])]
            return nodes, results, loads, per_worker
        finally:
            await supervisor.stop()

    nodes, results, loads, per_worker = asyncio.run(main())
    assert [ids for ids, _, _ in results] == single
    assert all(finish == "length" for _, finish, _ in results)
    assert len(nodes) == min(3, attention + experts)  # SPREAD put the ranks on different nodes
    for report in loads[experts:]:  # attention workers (after the expert ranks) never read routed experts
        assert report["expert_keys_read"] == 0
    # each expert worker read only its share: the same bytes per expert held (8 over 3 is 3, 3, 2)
    per_expert = {r["bytes_read"] / len(r["experts"]) for r in loads[:experts]}
    assert len(per_expert) == 1, [(r["bytes_read"], r["experts"]) for r in loads[:experts]]
    assert sorted(e for r in loads[:experts] for e in r["experts"]) == list(range(8))
    assert all(steps > 0 for steps in per_worker)


@pytest.mark.parametrize("attention,experts", [(1, 2), (2, 4), (2, 1)])
def test_overlapped_microbatches_equal_single_process(ray_cluster, gang_checkpoint, reference, attention, experts):
    """Ping-pong: steps of two requests or more run as two micro-batches; with two attention ranks
    their batches differ, one asks for one micro-batch (or has no tokens at all) while the other
    splits, and every rank still runs the agreed count."""
    ckpt, _ = gang_checkpoint
    ps, single = reference
    config = gang_config(ckpt, attention, experts)
    config = config.model_copy(update={"engine": config.engine.model_copy(update={"microbatches": 2,
                                                                                  "microbatch_min_tokens": 2})})

    async def main():
        supervisor = GangSupervisor(config)
        await supervisor.start()
        try:
            results = await asyncio.gather(*(collect(supervisor, p) for p in ps))
            stats = await asyncio.gather(*[a.stats.remote() for a in supervisor.gang.attention])
            return results, [s["microbatched_steps"] for s in stats]
        finally:
            await supervisor.stop()

    results, split_steps = asyncio.run(main())
    assert [ids for ids, _, _ in results] == single
    assert all(n > 0 for n in split_steps), split_steps


def test_placement_from_outside_is_what_every_rank_follows(ray_cluster, gang_checkpoint, reference):
    """A placement made by the caller (experts interleaved over the ranks, another order in each layer)
    reaches every rank: expert ranks load those experts, attention ranks dispatch to them, tokens stay
    exact."""
    ckpt, hf = gang_checkpoint
    ps, single = reference
    config = hf.config
    moe_layers = config.moe_layers
    ranks = [0, 1, 2]  # E=3 expert ranks first, then A=2
    table = {layer: [[ranks[(e + k) % 3]] for e in range(config.num_local_experts)] for k, layer in enumerate(moe_layers)}
    placement = Placement(table)

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 2, 3), placement=placement)
        await supervisor.start()
        try:
            return await asyncio.gather(*(collect(supervisor, p) for p in ps[:3])), supervisor.gang.loads
        finally:
            await supervisor.stop()

    results, loads = asyncio.run(main())
    assert [ids for ids, _, _ in results] == single[:3]
    assert [report["experts"] for report in loads[:3]] == [placement.experts_on(r, moe_layers[0]) for r in ranks]
    assert loads[0]["experts"] == [0, 3, 6]  # interleaved, not consecutive


def test_a_placement_that_does_not_fit_the_gang_is_refused(ray_cluster, gang_checkpoint):
    ckpt, hf = gang_checkpoint
    config = hf.config
    on_attention = Placement({layer: [[1]] * config.num_local_experts for layer in config.moe_layers})
    with pytest.raises(ValueError, match="not expert ranks"):
        build_gang(gang_config(ckpt, 1, 1), placement=on_attention)
    short = Placement({layer: [[1]] * (config.num_local_experts - 1) for layer in config.moe_layers})
    with pytest.raises(ValueError, match="experts placed"):
        build_gang(gang_config(ckpt, 1, 1), placement=short)


def test_invalid_request_is_rejected_by_the_gang(ray_cluster, gang_checkpoint):
    ckpt, _ = gang_checkpoint

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 1, 2))
        await supervisor.start()
        try:
            with pytest.raises(InvalidRequest):
                await collect(supervisor, [1, 2, 10**6])
            return await collect(supervisor, [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4))
        finally:
            await supervisor.stop()

    ids, finish, _ = asyncio.run(main())
    assert len(ids) == 4 and finish == "length"


@pytest.mark.parametrize("fault", ["kill", "raise"])
def test_a_failed_gang_keeps_its_survivors_and_reads_only_the_replaced_share(ray_cluster, gang_checkpoint,
                                                                             reference, fault):
    """A killed expert is replaced (only its share read again); an expert whose step raised stays, reset;
    the others keep their processes and weights; the gang then gives the same tokens."""
    ckpt, _ = gang_checkpoint
    ps, single = reference

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 2, 2), health_period_s=0.5)
        await supervisor.start()
        try:
            full = supervisor.last_build_bytes
            pids = [r["pid"] for r in (await supervisor.stats())["ranks"]]
            victim = supervisor.gang.experts[1]
            if fault == "kill":
                ray.kill(victim, no_restart=True)
            else:
                await victim.inject_fault.remote(1)
                asyncio.create_task(collect(supervisor, ps[0]))  # its first step raises on the expert
            await rebuilt(supervisor)
            after = [r["pid"] for r in (await supervisor.stats())["ranks"]]
            return full, supervisor.last_build_bytes, pids, after, await collect(supervisor, ps[1])
        finally:
            await supervisor.stop()

    full, reread, pids, after, (ids, finish, error) = asyncio.run(main())
    assert error is None and ids == single[1] and finish == "length"
    kept = [0, 2, 3]  # expert 0 and the attention ranks (expert ranks come first: the victim is rank 1)
    assert [after[r] for r in kept] == [pids[r] for r in kept]
    if fault == "kill":
        assert after[1] != pids[1] and 0 < reread < full / 2, (reread, full)
    else:
        assert after == pids and reread == 0


def test_idle_gang_does_not_keep_a_core_busy(ray_cluster, gang_checkpoint):
    ckpt, _ = gang_checkpoint

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 1, 2))
        await supervisor.start()
        try:
            await collect(supervisor, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3))
            await asyncio.sleep(1.0)  # let the ranks go idle
            ranks = supervisor.gang.ranks
            before = ray.get([r.cpu_seconds.remote() for r in ranks])
            await asyncio.sleep(3.0)
            after = ray.get([r.cpu_seconds.remote() for r in ranks])
            idle = ray.get([r.wave_state.remote() for r in ranks])
            woke_at = time.monotonic()
            ids, _, _ = await collect(supervisor, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=1))
            return [a - b for a, b in zip(after, before)], idle, time.monotonic() - woke_at, ids
        finally:
            await supervisor.stop()

    used, idle, wake_latency, ids = asyncio.run(main())
    assert all(state["idle"] for state in idle)
    assert max(used) < 0.3  # seconds of CPU over 3 s idle: nobody spins
    assert len(ids) == 1 and wake_latency < 5


def safetensors_sizes(ckpt) -> dict[str, int]:
    """Bytes of every tensor, read from the files' own headers (not through our reader)."""
    sizes = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                      if k != "__metadata__"})
    return sizes


def test_gang_start_up_reports_stages_in_order_and_each_ranks_bytes(ray_cluster, gang_checkpoint):
    ckpt, hf = gang_checkpoint
    board = open_board()  # as `maverick serve` does: the supervisor pushes its snapshots there

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 1, 2), name="gang-7")
        await supervisor.start()
        try:
            ranks = await asyncio.gather(*[r.load_progress.remote() for r in supervisor.gang.ranks])
            return supervisor.startup, ranks, supervisor.gang.loads
        finally:
            await supervisor.stop()

    startup, ranks, loads = asyncio.run(main())
    assert startup.history == ["placement", "process group", "weights", "warm-up", "ready"] == list(STAGES)
    sizes = safetensors_sizes(ckpt)
    routed = {k: n for k, n in sizes.items() if ".feed_forward.experts." in k}
    assert routed and all(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in routed)  # fused
    num_experts = hf.config.num_local_experts
    # expert ranks first, then the attention rank
    expected = [sum(routed.values()) * len(report["experts"]) // num_experts for report in loads[:2]]
    expected += [sum(n for k, n in sizes.items() if k.startswith("language_model.") and k not in routed)]
    assert sorted(e for report in loads[:2] for e in report["experts"]) == list(range(num_experts))
    assert [r["total_bytes"] for r in ranks] == expected
    assert [r["loaded_bytes"] for r in ranks] == expected == [report["bytes_read"] for report in loads]
    final = startup.snapshot()
    assert (final.ranks_up, final.num_ranks) == (3, 3)
    assert final.loaded_bytes == final.total_bytes == sum(expected) and final.bytes_per_s > 0
    pushed = wait_until(lambda: [stages for stages in ray.get(board.snapshots.remote())
                                 if stages[-1].gang == "gang-7" and stages[-1].stage == "ready"],
                        30, "the ready snapshot on the board")
    assert [s.stage for s in pushed[0]] == list(STAGES)  # every stage reached the board
    assert pushed[0][-1].loaded_bytes == sum(expected) and pushed[0][-1].ranks_up == 3
    ray.kill(board)


LONG = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)


async def _stream_until(supervisor, ps, done: asyncio.Event, stats):
    """Greedy streams of `ps` in turn, two at a time, until `done` is set: some always run. Each moves on
    (`router.resume`) if its attention rank leaves. Returns (prompt, tokens, started, ended) per stream."""
    from router.resume import resumable

    async def attempt(request, retry):
        async for batch in supervisor.generate_batches(request):
            yield batch

    async def one(prompt):
        started, ids = time.monotonic(), []
        async for batch in resumable(GenerateRequest(prompt, LONG), attempt, 0, stats):
            for out in batch:
                assert out.error is None, out.error
                ids += out.new_token_ids
        return prompt, ids, started, time.monotonic()

    async def lane(offset):
        results, i = [], offset
        while not done.is_set():
            results.append(await one(ps[i % len(ps)]))
            i += 2
        return results

    lanes = await asyncio.gather(lane(0), lane(1))
    return lanes[0] + lanes[1]


def test_attention_ranks_join_and_leave_a_running_gang(ray_cluster, gang_checkpoint):
    """1 -> 2 -> 1 attention ranks while streams run: every stream exact (those on the leaving rank moved
    on, planned), the expert ranks keep their processes and read no byte again, no new epoch."""
    from router.resume import ResumeStats

    ckpt, _ = gang_checkpoint
    ps = prompts(4, seed=3)
    engine = LLMEngine.from_model_dir(ckpt, EngineConfig(block_size=8), skip_tokenizer_init=True)
    single = {tuple(p): r.outputs[0].token_ids for p, r in zip(ps, LLM(engine=engine).generate(ps, LONG))}

    async def resize(supervisor, change):
        done, stats = asyncio.Event(), ResumeStats()
        streams = asyncio.create_task(_stream_until(supervisor, ps, done, stats))
        await asyncio.sleep(0.5)
        pause = await change()
        ended = supervisor.gang.last_regroup_ended  # the pause's end, not the (later) return of `change`
        await asyncio.sleep(0.5)  # streams started on the new set of ranks too
        done.set()
        return pause, await streams, ended, stats

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 1, 2), health_period_s=0.5)
        await supervisor.start()
        try:
            experts = supervisor.gang.experts
            before = ray.get([r.load_progress.remote() for r in experts])
            pids = [r["pid"] for r in (await supervisor.stats())["ranks"]]
            epoch = supervisor.epoch
            grown = await resize(supervisor, supervisor.add_attention_rank)
            pair = await asyncio.gather(*(collect(supervisor, p, LONG) for p in ps[:2]))  # the least loaded: one each
            two = await supervisor.stats()
            shrunk = await resize(supervisor, lambda: supervisor.remove_attention_rank(grace_s=0.0))
            one = await supervisor.stats()
            after = ray.get([r.load_progress.remote() for r in experts])
            assert [ids for ids, _, _ in pair] == [single[tuple(p)] for p in ps[:2]]
            return before, after, pids, epoch, supervisor.epoch, grown, two, shrunk, one, supervisor.restarts
        finally:
            await supervisor.stop()

    before, after, pids, epoch, epoch_after, grown, two, shrunk, one, restarts = asyncio.run(main())
    for pause, streams, ended, stats in (grown, shrunk):
        assert pause > 0
        for prompt, ids, _, _ in streams:
            assert ids == single[tuple(prompt)]
        # a stream ran across the pause (two lanes stream without a break: one was under way when it began)
        assert any(start < ended - pause and end > ended for _, _, start, end in streams)
    assert shrunk[3].planned_moves == shrunk[3].resumed_requests and grown[3].resumed_requests == 0
    assert two["attention_ranks"] == 2 and one["attention_ranks"] == 1 and one["regroups"] == 2
    assert two["requests_per_worker"][3] > 0  # the newcomer (rank 3: expert ranks 0-1, attention 2-3) served
    assert [r["pid"] for r in one["ranks"]] == pids  # expert ranks and the first attention rank kept
    assert after == before  # no expert rank read a byte again
    assert epoch_after == epoch and restarts == 0


# -- faults: the step watchdog and warm spares ---------------------------------------------------------

SHORT = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)  # greedy: a prefix of LONG's tokens
CUT = SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True)  # still running when the fault comes
HEALTH_PERIOD_S = 600.0  # the health check never runs in these tests: only the watchdog can find a hang


@pytest.fixture(scope="module")
def long_reference(gang_checkpoint):
    ckpt, _ = gang_checkpoint
    ps = prompts(8, seed=3)
    engine = LLMEngine.from_model_dir(ckpt, EngineConfig(block_size=8), skip_tokenizer_init=True)
    return ps, [r.outputs[0].token_ids for r in LLM(engine=engine).generate(ps, LONG)]


def burners(n: int) -> list[subprocess.Popen]:
    """Processes that keep `n` cores busy, as another tenant of the machine would."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.timeout(600)
def test_saturated_cores_declare_nothing_and_a_stopped_expert_is_found_by_the_step_watchdog(
        ray_cluster, gang_checkpoint, long_reference):
    ckpt, _ = gang_checkpoint
    ps, single = long_reference

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 1, 2), health_period_s=HEALTH_PERIOD_S)
        await supervisor.start()
        try:
            await asyncio.gather(*(collect(supervisor, p, SHORT) for p in ps))  # the rounds' times, unloaded
            busy = burners(os.cpu_count() or 2)
            try:
                saturated = await asyncio.gather(*(collect(supervisor, p, SHORT) for p in ps))
                deadlines = [s["stall_deadline_s"] for s in (await supervisor.stats())["ranks"]]
            finally:
                for proc in busy:
                    proc.kill()
            quiet = (supervisor.restarts, dict(supervisor.hangs_found))

            victim = (await supervisor.stats())["ranks"][0]["pid"]  # expert rank 0
            started = [asyncio.Event() for _ in ps]
            streams = [asyncio.create_task(collect(supervisor, p, CUT, s)) for p, s in zip(ps, started)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), timeout=120)  # mid-generation
            os.kill(victim, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                cut = await asyncio.wait_for(asyncio.gather(*streams), timeout=120)
                ended_after = time.monotonic() - stopped_at
                await rebuilt(supervisor)
            finally:
                try:
                    os.kill(victim, signal.SIGKILL)  # recovery kills the hung rank; this only makes sure
                except ProcessLookupError:
                    pass
            after = await collect(supervisor, ps[0], LONG)
            stats = await supervisor.stats()
            print(f"\nrecovery {stats['last_recovery_s']:.1f}s, by stage {stats['last_build_stages_s']}")
            return saturated, deadlines, quiet, cut, ended_after, dict(supervisor.hangs_found), after
        finally:
            await supervisor.stop()

    saturated, deadlines, quiet, cut, ended_after, hangs, after = asyncio.run(main())
    assert [ids for ids, _, error in saturated if error is None] == [s[:SHORT.max_tokens] for s in single], \
        "a saturated machine lost a stream"
    assert quiet == (0, {"watchdog": 0, "health_check": 0}), quiet
    # the hang: streams end (the in-process client does not resume them) and the watchdog said why
    assert all(finish == "error" and isinstance(error, Unavailable) for _, finish, error in cut), cut
    assert any("step watchdog" in str(error) for _, _, error in cut), [str(e) for _, _, e in cut]
    assert hangs == {"watchdog": 1, "health_check": 0}, hangs
    assert after == (single[0], "length", None)
    print(f"\nSIGSTOP of an expert: streams ended {ended_after:.1f}s later; stall deadlines {deadlines}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_warm_spares_replace_a_killed_expert_and_attention_rank_and_nothing_outlives_the_gang(
        ray_cluster, gang_checkpoint, long_reference):
    ckpt, _ = gang_checkpoint
    ps, single = long_reference

    def spares(supervisor) -> dict[str, int]:
        return {role: sum(s.role == role for s in supervisor.gang.spares) for role in ("expert", "attention")}

    async def spare_pid(supervisor, role: str) -> int:
        spare = next(s for s in supervisor.gang.spares if s.role == role)
        return (await spare.actor.wave_state.remote())["pid"]

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 1, 2, spares=1, attention_spares=1),
                                    health_period_s=1.0)  # finds the idle death
        await supervisor.start()
        both = {"expert": 1, "attention": 1}
        pids = set()
        try:
            await asyncio.to_thread(wait_until, lambda: spares(supervisor) == both, 120, "warm spares")
            expert_spare, attention_spare = [await spare_pid(supervisor, role) for role in ("expert", "attention")]
            before = [r["pid"] for r in (await supervisor.stats())["ranks"]]
            ray.kill(supervisor.gang.experts[1], no_restart=True)
            await rebuilt(supervisor)
            await asyncio.to_thread(wait_until, lambda: spares(supervisor) == both, 120, "the next expert spare")
            middle = [r["pid"] for r in (await supervisor.stats())["ranks"]]
            ray.kill(supervisor.gang.attention[0], no_restart=True)
            await asyncio.to_thread(wait_until, lambda: supervisor.restarts == 2 and supervisor.ready(), 120,
                                    "the gang back after its attention rank died")
            ids = await collect(supervisor, ps[1], LONG)
            await asyncio.to_thread(wait_until, lambda: spares(supervisor) == both, 120, "the next attention spare")
            stats = await supervisor.stats()
            spare_pids = [await spare_pid(supervisor, role) for role in ("expert", "attention")]
            pids = {r["pid"] for r in stats["ranks"]} | set(spare_pids)
            return expert_spare, attention_spare, before, middle, stats, spare_pids, ids, pids
        finally:
            await supervisor.stop()

    expert_spare, attention_spare, before, middle, stats, spare_pids, ids, pids = asyncio.run(main())
    after = [r["pid"] for r in stats["ranks"]]
    assert middle == [before[0], expert_spare, before[2]], (before, middle, expert_spare)
    assert after == [before[0], expert_spare, attention_spare], (before, after, attention_spare)
    assert stats["spares_adopted"] == 2 and stats["spares"] == 2 and not set(spare_pids) & set(after)
    assert ids == (single[1], "length", None)
    print(f"\nrecovery with a spare {stats['last_recovery_s']:.1f}s, by stage {stats['last_build_stages_s']}")
    wait_until(lambda: not any(alive(pid) for pid in pids), 60, "every rank and spare process gone after stop")
    # the gang's placement group and the spares' own: none is left reserving resources
    wait_until(lambda: all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()), 60,
               "every placement group removed after stop")


def test_a_gang_outlives_its_supervisor_is_taken_over_and_without_one_removes_itself(ray_cluster, gang_checkpoint,
                                                                                      reference):
    from ray.experimental import internal_kv

    from cluster.gang_registry import KV_NAMESPACE, GangRegistry, fingerprint
    from tests.cluster.owner import Owner

    ckpt, _ = gang_checkpoint
    ps, single = reference
    # the grace must outlast the take-over below on a loaded machine, or the ranks rightly remove themselves
    config = gang_config(ckpt, 1, 2, orphan_grace_s=8.0)
    first = Owner.options(name="owner-first").remote()
    name = ray.get(first.start.remote(config, "outlive"), timeout=300)
    before = ray.get(first.stats.remote())
    pids = [r["pid"] for r in before["ranks"]]
    assert GangRegistry("outlive", None, fingerprint(config)).claim_orphan() is None  # its owner lives
    second = Owner.options(name="owner-second").remote()  # started (and its imports done) before the kill
    ray.get(second.pid.remote(), timeout=120)
    os.kill(ray.get(first.pid.remote()), signal.SIGKILL)
    wait_until(lambda: not alive_actor(first), 60, "the first supervisor dead")

    assert ray.get(second.start.remote(config, "outlive"), timeout=300) == name  # the same gang, taken over
    after = ray.get(second.stats.remote())
    assert [r["pid"] for r in after["ranks"]] == pids and after["adoptions"] == 1 and after["restarts"] == 0
    assert ray.get(second.generate.remote(ps[0], GREEDY), timeout=120) == single[0]
    time.sleep(1.5 * config.orphan_grace_s)  # past a grace: only the second supervisor's renewals keep the ranks
    assert all(alive(pid) for pid in pids)
    groups = {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
    assert groups, "the gang's detached placement group"

    os.kill(ray.get(second.pid.remote()), signal.SIGKILL)  # and no supervisor comes back
    wait_until(lambda: not any(alive(pid) for pid in pids), 60, "the orphaned ranks gone after their grace")
    table = ray.util.placement_group_table()
    wait_until(lambda: all(ray.util.placement_group_table()[g]["state"] == "REMOVED" for g in groups), 60,
               "the orphaned gang's placement group removed")
    assert not internal_kv._internal_kv_list("gangs/outlive/", namespace=KV_NAMESPACE), table


def alive_actor(actor) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=5)
        return True
    except Exception:
        return False
