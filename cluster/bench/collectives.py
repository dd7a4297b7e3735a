"""A gang step's collectives alone, with nothing computed between them, per layout.

`bench ep` reports them beside the gang's step time. It spawns 1 attention + E expert processes (one
thread each, gloo on 127.0.0.1, no Ray) that run, per step, what the gang's ranks run: the wave's
all-reduce, then for every MoE layer the real dispatch and combine (`AllToAllExperts`, `serve_layer`)
with the experts replaced by the identity. The median says what the transport costs per step on
this machine: the latency of the messages, mostly waking the threads that receive them (gloo hands
each collective from the caller to its worker thread, and every message from its socket thread).
It is not a strict floor: back to back, the messages of three processes on two cores queue behind
each other, while in a real step the computation spaces them out.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import statistics
import time

import torch
import torch.distributed as dist

from workers.expert_parallel import AllToAllExperts, ExpertGroup, Placement, serve_layer
from workers.rank import free_port, gloo_group


def _identity(x_ND: torch.Tensor, experts_N: torch.Tensor) -> torch.Tensor:
    return x_ND


def _rank(rank: int, world: int, port: int, hidden: int, moe_layers: list[int], num_experts: int,
          rows: list[int], steps: int, results) -> None:
    torch.set_num_threads(1)
    group, _store = gloo_group("127.0.0.1", port, rank, world, datetime.timedelta(seconds=120))
    attention = world - 1  # expert ranks first, as in a gang
    comm = ExpertGroup(group, rank, world, attention, hidden, torch.float32)
    placement = Placement.contiguous(moe_layers, num_experts, list(range(attention)))
    moe = [AllToAllExperts(comm, placement, layer) for layer in moe_layers]
    generator = torch.Generator().manual_seed(rank)
    step_ms = []
    for n in rows:
        x_ND = torch.randn(n, hidden, generator=generator)
        experts_N = torch.randint(0, num_experts, (n,), generator=generator)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            flags = torch.tensor([0, n if rank == attention else 0, 1], dtype=torch.long)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            comm.agree(flags.tolist()[1:])
            for layer in moe:
                if rank == attention:
                    layer.combine(layer.dispatch(x_ND, experts_N))
                else:
                    serve_layer(comm, _identity)
            times.append(time.perf_counter() - start)
        step_ms.append(statistics.median(times[steps // 10:]) * 1e3)  # the first tenth warms up
    if rank == attention:
        results.put(step_ms)


def collectives_alone(expert_ranks: int, hidden: int, moe_layers: list[int], num_experts: int, rows: list[int],
                  steps: int = 400, timeout_s: float = 300) -> list[float]:
    """Median ms per step of the gang's collectives alone, for each of `rows` (tokens per step)."""
    ctx = mp.get_context("spawn")
    results, port, world = ctx.Queue(), free_port(), 1 + expert_ranks
    procs = [ctx.Process(target=_rank, args=(r, world, port, hidden, moe_layers, num_experts, rows, steps, results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                return results.get(timeout=1.0)
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"collectives alone ({world} processes): exit codes {failed}, "
                                       f"or no result within {timeout_s:.0f} s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
