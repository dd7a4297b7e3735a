"""Expert parallelism over one process group: placement, and the one dispatch/combine pair.

Ranks 0..E-1 are expert workers, E..E+A-1 attention workers: experts first, so attention ranks can
join or leave at the end (`ExpertGroup.regroup`) while every expert rank keeps its number, and with it
the placement table. Before each step's forward, all ranks
agree on the step's micro-batch count M and capacity T (the most routed rows of any attention rank's
micro-batch) in the wave's one all-reduce (`workers.wave`, `agree`). Then for every MoE layer, in order, and for each of
its M micro-batches, every rank takes part in two collectives of fixed shape, so no rank needs to
learn anything about the others' rows first (no count exchange, no host sync):
  1. dispatch `all_to_all_single`: each attention rank sends a block of T rows to every expert rank:
     its score-scaled activations routed there, the expert id as one extra column, and padding rows
     with id -1 after them;
  2. combine `all_to_all_single`: each expert rank returns the same blocks with the real rows' outputs.
Expert ranks send nothing in (1), attention ranks receive nothing from each other. A block holds at
most T real rows because top-1 routing sends each row to exactly one rank. Padding costs bytes (E
blocks of T rows per attention rank, about E x the real rows), nothing in latency at these sizes.
Dispatch is asynchronous and posts the combine's receive at once, so the attention rank computes the
shared expert, and with M = 2 the other micro-batch's attention, while its tokens are away.
The local path (`model.moe.RoutedExperts`) stays the reference these are tested against.

Shape suffixes: N routed rows, D hidden, W world size, E experts, B = blocks x T buffer rows.
(Outside shape suffixes, E is the number of expert ranks.)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.decoder import Llama4ForCausalLM
from model.moe import ExpertSlices, RoutedExperts, count_per_bin
from workers.expert_placement import replica_of_rows


class Placement:
    """(MoE layer, expert) -> the ranks holding that expert; dispatch reads only this table."""

    def __init__(self, table: dict[int, list[list[int]]]):
        self.update(table)

    def update(self, table: dict[int, list[list[int]]]) -> None:
        """Follow a new table from now on (a rebalance's switch step: every rank swaps at the same step)."""
        dest, replicas = {}, {}
        for layer, experts in table.items():
            if any(not ranks for ranks in experts):
                raise ValueError(f"layer {layer}: every expert needs a rank")
            width = max(len(r) for r in experts)
            # each expert's ranks, padded by repeating the first (never picked: `replica_of_rows` < count)
            dest[layer] = torch.tensor([(r * width)[:width] for r in experts], dtype=torch.long)
            replicas[layer] = torch.tensor([len(r) for r in experts], dtype=torch.long)
        self.table = table  # layer -> [ranks of expert 0, ranks of expert 1, ...]
        self._dest, self._replicas = dest, replicas
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def contiguous(cls, moe_layers: list[int], num_experts: int, expert_ranks: list[int]) -> "Placement":
        """Consecutive experts per rank, as even as the counts allow: 128 over 6 ranks is 22,22,21,21,21,21."""
        k = len(expert_ranks)
        if not 0 < k <= num_experts:
            raise ValueError(f"{k} expert ranks cannot split {num_experts} experts (each needs at least one)")
        owners = []
        for i, rank in enumerate(expert_ranks):
            owners += [[rank]] * (num_experts // k + (i < num_experts % k))
        return cls({layer: owners for layer in moe_layers})

    def check(self, moe_layers: list[int], num_experts: int, expert_ranks: list[int]) -> None:
        """Every expert of every MoE layer held by at least one expert rank, and nothing else."""
        if sorted(self.table) != sorted(moe_layers):
            raise ValueError(f"placement covers layers {sorted(self.table)}, the model's MoE layers are {moe_layers}")
        for layer, owners in self.table.items():
            if len(owners) != num_experts:
                raise ValueError(f"layer {layer}: {len(owners)} experts placed, the model has {num_experts}")
            strangers = {r for ranks in owners for r in ranks} - set(expert_ranks)
            if strangers:
                raise ValueError(f"layer {layer}: ranks {sorted(strangers)} are not expert ranks {expert_ranks}")

    def experts_on(self, rank: int, layer: int) -> list[int]:
        return [e for e, ranks in enumerate(self.table[layer]) if rank in ranks]

    def destinations(self, layer: int, experts_N: torch.Tensor, next_E: torch.Tensor | None = None) -> torch.Tensor:
        """The rank each routed row goes to: each expert's rows dealt round robin over its replicas,
        continuing from `next_E` (`replica_of_rows`)."""
        key = (layer, experts_N.device)
        if key not in self._on_device:  # copied once per table (a GPU step then reads no host tensor)
            self._on_device[key] = (self._dest[layer].to(experts_N.device), self._replicas[layer].to(experts_N.device))
        dest_EW, replicas_E = self._on_device[key]
        if dest_EW.shape[1] == 1:
            return dest_EW[experts_N, 0]
        return dest_EW[experts_N, replica_of_rows(experts_N, replicas_E, next_E)]


@dataclass
class Pending:
    slot_N: torch.Tensor  # each row's place in the fixed-shape dispatch buffer
    sent: dist.Work | None  # the dispatch
    back_BD: torch.Tensor  # the combine's receive buffer, filled when `back` completes
    back: dist.Work | None


class ExpertGroup:
    """The collectives of one rank, shared by every MoE layer (they run in layer order)."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int, expert_ranks: int, hidden: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.rank, self.world_size = rank, world_size
        self.expert_ranks = expert_ranks  # ranks 0..expert_ranks-1 hold experts, the rest run attention
        self._binding: tuple[dist.ProcessGroup | None, threading.Thread | None] = (group, None)
        self.hidden, self.dtype, self.device = hidden, dtype, torch.device(device)
        self.alltoall_seconds = 0.0  # time spent in collectives, since start
        self.alltoall_bytes = 0  # payload this rank sent: dispatch on attention ranks, combine on expert ranks
        self.capacity = 0  # rows per block this step (agreed at the step's first MoE layer)

    def bind(self, group: dist.ProcessGroup, world_size: int, thread: threading.Thread) -> None:
        """From now on only `thread` (the new epoch's wave) runs collectives, on `group` of `world_size`
        ranks (attention ranks may have joined or left at the end): a wave thread of an earlier epoch
        that reaches one raises instead of joining the new group's sequence."""
        self.world_size = world_size
        self._binding = (group, thread)

    @property
    def is_expert(self) -> bool:
        return self.rank < self.expert_ranks

    @property
    def group(self) -> dist.ProcessGroup | None:
        group, thread = self._binding  # one read: the pair is always consistent
        if thread is not None and thread is not threading.current_thread():
            raise RuntimeError("a wave of a failed epoch reached a collective of the new one")
        return group

    def agree(self, agreed: list[int]) -> int:
        """The gang's agreed [capacity T, micro-batches M] for this step (the wave's all-reduce MAX of
        every rank's `PlannedStep.proposal`; expert ranks propose [0, 0]): sets T, returns M."""
        self.capacity = agreed[0]
        return max(agreed[1], 1)

    def splits(self, to_experts: bool) -> list[int]:
        """Rows per rank of a fixed-shape block: T for every expert rank (attention side) or every
        attention rank (expert side), 0 for the others."""
        E, A = self.expert_ranks, self.world_size - self.expert_ranks
        return [self.capacity] * E + [0] * A if to_experts else [0] * E + [self.capacity] * A

    def all_to_all(self, send_RD: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                   async_op: bool = False) -> tuple[torch.Tensor, dist.Work | None]:
        start = time.perf_counter()
        recv_RD = torch.empty(sum(recv_counts), send_RD.shape[1], dtype=send_RD.dtype, device=self.device)
        work = dist.all_to_all_single(recv_RD, send_RD.contiguous(), recv_counts, send_counts,
                                      group=self.group, async_op=async_op)
        self.alltoall_bytes += send_RD.numel() * send_RD.element_size()
        self.alltoall_seconds += time.perf_counter() - start  # async: only the time to launch it
        return recv_RD, work

    def wait(self, work: dist.Work | None) -> None:
        if work is not None:
            start = time.perf_counter()
            work.wait()
            self.alltoall_seconds += time.perf_counter() - start


class AllToAllExperts(nn.Module):
    """Stands in for `model.moe.RoutedExperts` on an attention rank: same `dispatch`/`combine` pair,
    the experts themselves live on the expert ranks."""

    def __init__(self, comm: ExpertGroup, placement: Placement, layer: int):
        super().__init__()
        self.comm, self.placement, self.layer = comm, placement, layer
        self.next_E: torch.Tensor | None = None  # each expert's next replica in its round robin

    def dispatch(self, x_ND: torch.Tensor, experts_N: torch.Tensor) -> Pending:
        """Send the rows (asynchronously) and post the combine's receive at once: the collectives of
        every rank then come in one order, dispatch and combine per micro-batch, even while another
        micro-batch computes between this dispatch and its combine."""
        comm, n = self.comm, x_ND.shape[0]
        capacity = comm.capacity  # agreed for the step (`agree`)
        if self.next_E is None:  # attention ranks start their rounds apart
            self.next_E = torch.full((len(self.placement.table[self.layer]),), comm.rank, device=x_ND.device)
        dest_N = self.placement.destinations(self.layer, experts_N, self.next_E)  # expert rank = its block
        order_N = torch.argsort(dest_N, stable=True)
        counts_B = count_per_bin(dest_N, comm.expert_ranks)
        starts_B = torch.cumsum(counts_B, 0) - counts_B
        sorted_dest_N = dest_N.index_select(0, order_N)
        slot_N = torch.empty_like(order_N)
        # a row's slot: its block's start plus its rank among the rows of that block (arrival order)
        slot_N[order_N] = sorted_dest_N * capacity + torch.arange(n, device=x_ND.device) - starts_B[sorted_dest_N]
        blocks = comm.expert_ranks
        # NOTE: the expert id rides as an extra column, exact in fp32 and in bf16 up to 256 experts; -1 pads
        send_BD1 = torch.full((blocks * capacity, comm.hidden + 1), -1, dtype=x_ND.dtype, device=x_ND.device)
        send_BD1.index_copy_(0, slot_N, torch.cat([x_ND, experts_N.to(x_ND.dtype)[:, None]], dim=1))
        blocks, zeros = comm.splits(to_experts=True), [0] * comm.world_size
        _, sent = comm.all_to_all(send_BD1, blocks, zeros, async_op=True)
        empty = torch.empty(0, comm.hidden, dtype=comm.dtype, device=comm.device)
        back_BD, back = comm.all_to_all(empty, zeros, blocks, async_op=True)
        return Pending(slot_N, sent, back_BD, back)

    def combine(self, pending: Pending) -> torch.Tensor:
        self.comm.wait(pending.sent)
        self.comm.wait(pending.back)
        return pending.back_BD.index_select(0, pending.slot_N)


def shard_experts(model: Llama4ForCausalLM, comm: ExpertGroup, placement: Placement) -> nn.Module:
    """Expert parallelism applied from outside the model, on the meta device before anything is loaded.

    An attention rank keeps the model with every MoE block's routed experts
    swapped for the all-to-all pair (their weights stay on the expert ranks); an expert rank gets only
    the experts `placement` gives it, per MoE layer (`ExpertSlices`).
    """
    layers = [layer for layer, _ in model.moe_blocks()]
    placement.check(layers, model.config.num_experts, list(range(comm.expert_ranks)))
    if not comm.is_expert:
        for layer, moe in model.moe_blocks():
            moe.experts = AllToAllExperts(comm, placement, layer)
        return model
    return ExpertSlices(model.config, {layer: placement.experts_on(comm.rank, layer) for layer in layers})


def serve_layer(comm: ExpertGroup, experts: RoutedExperts,
                load_E: torch.Tensor | None = None, sync_free: bool = False) -> int | torch.Tensor:
    """An expert rank's share of one MoE layer for one micro-batch (after the step's `agree`):
    receive blocks, run the grouped FFN on their real rows, send the blocks back; returns the real rows
    served. `load_E` (per expert of the model) counts the rows each expert received. `sync_free`
    (GPU): the whole padded buffer goes through `forward_padded`, and nothing is read on the host."""
    zeros = [0] * comm.world_size
    blocks = comm.splits(to_experts=False)
    empty = torch.empty(0, comm.hidden + 1, dtype=comm.dtype, device=comm.device)
    rows_BD1, _ = comm.all_to_all(empty, zeros, blocks)
    experts_B = rows_BD1[:, -1].long()
    if load_E is not None:  # padding (-1) lands in bin 0, dropped
        load_E += count_per_bin(experts_B + 1, load_E.numel() + 1)[1:]
    if sync_free:
        out_BD = experts.forward_padded(rows_BD1[:, :-1], experts_B)
        served = (experts_B >= 0).sum()
    else:
        real_N = torch.nonzero(experts_B >= 0).squeeze(1)
        x_ND, experts_N = rows_BD1[:, :-1].index_select(0, real_N), experts_B.index_select(0, real_N)
        # padding rows go back unwritten: their senders never read them
        out_BD = torch.empty(rows_BD1.shape[0], comm.hidden, dtype=comm.dtype, device=comm.device)
        if real_N.numel():
            out_BD.index_copy_(0, real_N, experts(x_ND, experts_N))
        served = int(real_N.numel())
    comm.all_to_all(out_BD, blocks, zeros)
    return served
