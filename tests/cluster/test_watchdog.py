"""Faults cost little: a rank that stops answering mid-step is declared hung by the ranks kept waiting
for it (the step watchdog), not by the periodic health check; a machine whose cores another process
saturates declares nothing; a warm spare takes a failed expert rank's place, and nothing outlives the
gang. On a real 3-node Ray cluster, gangs of 1 attention + 2 expert ranks."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import ray

from cluster.probe import wait_until
from cluster.supervisor import GangSupervisor
from tests.cluster.test_gang import collect, gang_config, prompts, rebuilt
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import Unavailable
from workers.llm import LLM
from workers.sampling_params import SamplingParams

LONG = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True)
SHORT = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)  # greedy: a prefix of LONG's tokens
HEALTH_PERIOD_S = 600.0  # the health check never runs in these tests: only the watchdog can find a hang


@pytest.fixture(scope="module")
def expected(gang_checkpoint):
    ckpt, _ = gang_checkpoint
    ps = prompts(8, seed=3)
    engine = LLMEngine.from_model_dir(ckpt, EngineConfig(block_size=8), skip_tokenizer_init=True)
    return ps, [r.outputs[0].token_ids for r in LLM(engine=engine).generate(ps, LONG)]


def burners(n: int) -> list[subprocess.Popen]:
    """Processes that keep `n` cores busy, as another tenant of the machine would."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.timeout(600)
def test_saturated_cores_declare_nothing_and_a_stopped_expert_is_found_by_the_step_watchdog(
        ray_cluster, gang_checkpoint, expected):
    ckpt, _ = gang_checkpoint
    ps, single = expected

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 1, 2), health_period_s=HEALTH_PERIOD_S)
        await supervisor.start()
        try:
            await asyncio.gather(*(collect(supervisor, p, LONG) for p in ps))  # the rounds' times, unloaded
            busy = burners(os.cpu_count() or 2)
            try:
                saturated = await asyncio.gather(*(collect(supervisor, p, SHORT) for p in ps))
                deadlines = [s["stall_deadline_s"] for s in (await supervisor.stats())["ranks"]]
            finally:
                for proc in busy:
                    proc.kill()
            quiet = (supervisor.restarts, dict(supervisor.hangs_found))

            victim = (await supervisor.stats())["ranks"][0]["pid"]  # expert rank 0
            streams = [asyncio.create_task(collect(supervisor, p, LONG)) for p in ps]
            await asyncio.sleep(1.0)  # mid-generation
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
    assert all(d is not None and d > 0 for d in deadlines), deadlines
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


def test_a_warm_spare_replaces_a_killed_expert_and_nothing_outlives_the_gang(ray_cluster, gang_checkpoint, expected):
    ckpt, _ = gang_checkpoint
    ps, single = expected

    async def main():
        supervisor = GangSupervisor(gang_config(ckpt, 1, 2, spares=1), health_period_s=1.0)  # finds the idle death
        await supervisor.start()
        pids = set()
        try:
            await asyncio.to_thread(wait_until, lambda: len(supervisor.gang.spares) == 1, 120, "a warm spare")
            spare = supervisor.gang.spares[0]
            spare_pid = (await spare.actor.wave_state.remote())["pid"]
            before = [r["pid"] for r in (await supervisor.stats())["ranks"]]
            ray.kill(supervisor.gang.experts[1], no_restart=True)
            await rebuilt(supervisor)
            ids = await collect(supervisor, ps[1], LONG)
            await asyncio.to_thread(wait_until, lambda: len(supervisor.gang.spares) == 1, 120, "the next spare")
            stats = await supervisor.stats()
            next_spare = (await supervisor.gang.spares[0].actor.wave_state.remote())["pid"]
            pids = {r["pid"] for r in stats["ranks"]} | {next_spare}
            return spare_pid, before, stats, next_spare, ids, pids
        finally:
            await supervisor.stop()

    spare_pid, before, stats, next_spare, ids, pids = asyncio.run(main())
    after = [r["pid"] for r in stats["ranks"]]
    assert after[1] == spare_pid and after[0] == before[0] and after[2] == before[2], (before, after, spare_pid)
    assert stats["spares_adopted"] == 1 and stats["spares"] == 1 and next_spare not in after
    assert ids == (single[1], "length", None)
    print(f"\nrecovery with a spare {stats['last_recovery_s']:.1f}s, by stage {stats['last_build_stages_s']}")
    wait_until(lambda: not any(alive(pid) for pid in pids), 60, "every rank and spare process gone after stop")
