"""Each system measured alone (`../shared/PEERS.md`): started, warmed, measured and stopped around its
own part of each round, with nothing else of the benchmark's alive beside it.

On 2 cores whatever is alive takes CPU from whatever is measured: an idle Ray stack costs a peer more
than an idle offline engine costs us. So a round starts one system, measures every level (and every
door of that system, e.g. HTTP and gRPC of one `maverick serve`), stops it, waits until its whole
process tree has exited, then starts the next. Round r starts at the r-th system, so none always
follows the same one; doors alternate by round and level. Every round's figures are kept; reports
take medians.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.terminal import StepLine, format_step


@dataclass
class System:
    """`start()` -> a handle; `measure(handle, door, concurrency, round)` -> a result dict; `stop(handle)`.
    `doors`: what one start measures, each reported under its own name. `idle_s`: in round 1, after
    warm-up, the CPU its process tree burns while idle for this long (0: skipped)."""

    name: str
    start: Callable[[], Any]
    measure: Callable[[Any, str, int, int], dict]
    stop: Callable[[Any], None]
    doors: list[str] = field(default_factory=list)
    idle_s: float = 0.0

    def __post_init__(self):
        self.doors = self.doors or [self.name]


@dataclass
class Rounds:
    """samples[door][concurrency] = one result per round; idle[system] = cores per process kind."""

    samples: dict[str, dict[int, list[dict]]]
    idle: dict[str, dict[str, float]]
    extras: dict[str, Any]


def run_rounds(systems: list[System], levels: list[int], repeat: int, target: str, steps: StepLine,
               after_round: Callable[[System, Any, int], Any] | None = None) -> Rounds:
    """`after_round(system, handle, round)`, if given, runs before each stop; what it returns for the
    last round is kept in `extras[system.name]`."""
    samples = {door: {c: [] for c in levels} for s in systems for door in s.doors}
    idle, extras = {}, {}
    for rep in range(repeat):
        shift = rep % len(systems)
        for system in systems[shift:] + systems[:shift]:
            steps.show(f"bench {target}  {system.name}  starting (round {rep + 1}/{repeat})")
            before = set(process_tree())
            handle = system.start()
            tree = [p for p in process_tree() if p not in before]
            try:
                if rep == 0 and system.idle_s:
                    steps.show(f"bench {target}  {system.name}  idle for {system.idle_s:.0f} s")
                    idle[system.name] = idle_cores(tree, system.idle_s)
                for level, c in enumerate(levels, 1):
                    doors = system.doors if (rep + level) % 2 else system.doors[::-1]
                    for door in doors:
                        step = format_step(target, door, c, level, len(levels), rep + 1, repeat)
                        steps.show(step)
                        got = system.measure(handle, door, c, rep)
                        samples[door][c].append(got)
                        steps.print(f"{step}: {got['tok_s']:.1f} tok/s" + (
                            f", TPOT {got['tpot_ms']:.1f} ms, TTFT {got['ttft_ms']:.0f} ms" if "ttft_ms" in got else ""))
                if after_round is not None:
                    extra = after_round(system, handle, rep)
                    if extra is not None:
                        extras[system.name] = extra
            finally:
                tree += [p for p in process_tree() if p not in before and p not in tree]  # e.g. a reloaded HAProxy
                system.stop(handle)
                wait_gone(tree)
    return Rounds(samples, idle, extras)


def median_row(rounds: list[dict], prefix: str) -> dict:
    """The median-throughput round's figures under `prefix_`, plus every round's tok/s (and TPOT)."""
    median = sorted(rounds, key=lambda r: r["tok_s"])[len(rounds) // 2]
    row = {f"{prefix}_{k}": v for k, v in median.items() if isinstance(v, (int, float, dict))}
    row[f"{prefix}_rounds_tok_s"] = [r["tok_s"] for r in rounds]
    if "tpot_ms" in median:
        row[f"{prefix}_tpot_ms"] = statistics.median(r["tpot_ms"] for r in rounds)
        row[f"{prefix}_rounds_tpot_ms"] = [r["tpot_ms"] for r in rounds]
    return row


def process_tree(pid: int | None = None) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid or os.getpid()).children(recursive=True)]
    except psutil.Error:
        return []


def wait_gone(pids: list[int], timeout_s: float = 90.0) -> None:
    """Until every process of a stopped system has exited (Ray's raylet and workers outlive the CLI by
    seconds); what is left after `timeout_s` is killed."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def cpu_seconds(pids: list[int]) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds): Ray workers by their title (`ray::ServeReplica:maverick:ingress`),
    this process as `bench client`, others by name."""
    import psutil

    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            times, cmdline, name = proc.cpu_times(), proc.cmdline(), proc.name()
        except psutil.Error:
            continue
        out[pid] = ("bench client" if pid == os.getpid() else _kind(name, cmdline), times.user + times.system)
    return out


def _kind(name: str, cmdline: list[str]) -> str:
    """`ray::ServeController`, `raylet`, or for a Python script its file (Ray's `log_monitor.py`)."""
    title = (cmdline or [name])[0]
    if title.startswith("ray::"):
        return title.split()[0]
    if name.startswith("python"):
        script = next((a for a in cmdline[1:] if a.endswith(".py")), None)
        return Path(script).name if script else name
    return name


def cores_between(before: dict, after: dict, wall_s: float) -> dict[str, float]:
    """Cores each process kind used between two `cpu_seconds` snapshots (above 0.0005), largest first."""
    used: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        used[kind] = used.get(kind, 0.0) + (seconds - before.get(pid, (kind, 0.0))[1]) / wall_s
    return {k: round(v, 4) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0.0005}


def idle_cores(pids: list[int], seconds: float) -> dict[str, float]:
    """What an idle system's processes burn, in cores by process kind, over `seconds`."""
    before, start = cpu_seconds(pids), time.perf_counter()
    time.sleep(seconds)
    return cores_between(before, cpu_seconds(pids), time.perf_counter() - start)
