"""Where a rebalance's experts should come from on this machine: the checkpoint or a peer rank.

`bench ep --eplb` reports both for the same experts (the hot pair of every MoE layer):
- checkpoint: what an expert rank's staging does (`ExpertSlices` on the meta device, filled by byte
  range through `CheckpointReader`); the file was read moments before, so this is the page cache;
- peer: one process sends the same tensors to another over a gloo group of their own on 127.0.0.1
  (what a peer copy over the gang's process group would cost; no Ray, one thread each).
Each is the best of 3. The faster one is what staging should use; on CPUs it is the checkpoint.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import time

import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import CheckpointReader
from model.config import load_config
from model.loader import expert_slice_names, load_model, materialize
from model.moe import ExpertSlices
from workers.rank import free_port, gloo_group

EXPERTS = [0, 1]  # the hot pair: what a rebalance copies to the ranks that take replicas


def _read(model_dir: str) -> tuple[nn.Module, int, float]:
    config = load_config(model_dir)
    with torch.device("meta"):
        shard = ExpertSlices(config, {layer: EXPERTS for layer in config.moe_layers})
    materialize(shard, "cpu")
    start = time.perf_counter()
    with CheckpointReader(model_dir) as reader:
        report = load_model(shard, reader, torch.float32, strict=False, names=expert_slice_names)
    return shard, report.bytes_read, time.perf_counter() - start


def _peer(rank: int, port: int, shapes: list[tuple[int, ...]], results) -> None:
    torch.set_num_threads(1)
    group, _store = gloo_group("127.0.0.1", port, rank, 2, datetime.timedelta(seconds=120))
    tensors = [torch.randn(s) if rank == 0 else torch.empty(s) for s in shapes]
    best = float("inf")
    for _ in range(3):
        dist.all_reduce(torch.zeros(1), group=group)  # both ready: time the transfer only
        start = time.perf_counter()
        for t in tensors:  # the group is outside torch's registry: its own send/recv, not dist.send
            (group.send([t], 1, 0) if rank == 0 else group.recv([t], 0, 0)).wait()
        best = min(best, time.perf_counter() - start)
    if rank == 1:
        results.put(best)


def copy_paths(model_dir: str) -> dict:
    shard, nbytes, _ = _read(model_dir)  # a first read fills the page cache
    checkpoint_s = min(_read(model_dir)[2] for _ in range(3))
    shapes = [tuple(p.shape) for p in shard.parameters()]
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_peer, args=(rank, port, shapes, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    peer_s = results.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return {"experts_per_layer": len(EXPERTS), "bytes": nbytes,
            "checkpoint_ms": checkpoint_s * 1e3, "checkpoint_gb_s": nbytes / checkpoint_s / 1e9,
            "peer_gloo_ms": peer_s * 1e3, "peer_gloo_gb_s": nbytes / peer_s / 1e9,
            "faster": "checkpoint" if checkpoint_s <= peer_s else "peer"}
